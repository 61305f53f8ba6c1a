"""Float32 decoding kernels for x86 CPUs with AVX2, in `cpu_kernels.c`.

Why: a draft tree is a handful of rows, and on the 2-core AMD EPYC we measure on, MKL's fp32 GEMM
with 2-16 rows costs 2-3x its 1-row cost, so a tree pass cost far more than the tokens it won.
`small_gemm` streams each weight tile from memory once for all rows: SmolLM2-135M's 30-layer body
matmuls took 38 ms (1 row), 70 ms (4), 72 ms (16) with MKL and 18, 22, 36 ms with it. On CPUs with
AVX-512 (the 2-core Intel Xeons here) a wider variant takes 16 rows per read of the weights: body
1 / 8 / 12 / 16 rows 25.6 / 31.3 / 34.9 / 43.2 ms with the AVX2 path, 23.0 / 24.8 / 27.1 / 30.0 with it. Once the
matmuls were fast, the small torch ops between them (about sixty a layer, a few microseconds of
dispatch each) were a third of a pass; `rms_norm` and `rotary` do their rows in one call each.

They are built with the system's C compiler at first use and cached on disk. Where that is impossible
(no compiler, no AVX2, another architecture, `SPECSTREAM_CPU_KERNELS=0`) `pack` returns None,
`fits` is False, and callers use torch: slower, never wrong.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
TILE = 16  # columns per packed tile; matches TILE in cpu_kernels.c
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")


class PackedMatrix:
    """A float32 CPU weight (N, K), repacked as (ceil(N / 16), K, 16) tiles for `x @ weight.T`;
    with `bfloat16` the tiles hold the weight rounded to bfloat16 (half the bytes to read, logits
    off by up to about 2^-9 of |x| |w|: for ranking drafts or screening candidates, see `ExactArgmax`)."""

    def __init__(self, weight: torch.Tensor, library: ctypes.CDLL, bfloat16: bool = False):
        self.out_features, self.in_features = weight.shape
        tiles = -(-self.out_features // TILE)
        padded = weight.new_zeros(tiles * TILE, self.in_features)
        padded[: self.out_features] = weight.detach()
        if bfloat16:
            padded = padded.to(torch.bfloat16).view(torch.int16)
        self.packed = padded.view(tiles, TILE, self.in_features).transpose(1, 2).contiguous()
        self.bfloat16 = bfloat16
        self._library = library

    def accepts(self, x: torch.Tensor) -> bool:
        """Whether the kernel may compute `x @ weight.T`: float32 CPU rows and no autograd. Any row
        count: it stays faster than MKL here up to long prompts (a 400-row layer: 30 vs 31 ms), and one
        kernel for every pass keeps a token's bits the same in a tree as in plain decoding."""
        return (
            x.dtype == torch.float32
            and x.device.type == "cpu"
            and x.numel() > 0
            and not (torch.is_grad_enabled() and x.requires_grad)
        )

    def __call__(self, x: torch.Tensor, avx2_only: bool = False) -> torch.Tensor:
        """x (..., K) -> (..., N); `avx2_only` skips the AVX-512 path (for the tests: same bits)."""
        rows = x.reshape(-1, self.in_features).contiguous()
        out = torch.empty(rows.shape[0], self.out_features, dtype=torch.float32)
        if self.bfloat16:
            gemm = self._library.small_gemm_bf16
        else:
            gemm = self._library.small_gemm_avx2 if avx2_only else self._library.small_gemm
        gemm(
            rows.data_ptr(),
            rows.shape[0],
            self.in_features,
            self.packed.data_ptr(),
            self.out_features,
            out.data_ptr(),
            torch.get_num_threads(),
        )
        return out.view(*x.shape[:-1], self.out_features)


class ExactArgmax:
    """Greedy decoding's argmax over an LM head (V, K), the same token as `argmax` of the float32
    kernel's logits, at about half the memory read: the head in bfloat16 screens the columns,
    and only those within a proven error bound of the best are recomputed in float32 (in C,
    `head_argmax`). On a 2-core Xeon the head took 5.5 ms a pass of about 40 in float32.

    Bound, per column i and row x (Cauchy-Schwarz): |x . (w_i - bf16(w_i))| <= |x| |w_i - bf16(w_i)|,
    and each float32 dot product of K terms is within K u / (1 - K u) |x| |w| of the exact one
    (u = 2^-24); `slack` holds their sum per |x|, plus the rounding of the bound's own arithmetic,
    with a 1 % margin."""

    def __init__(self, head: torch.Tensor, library: ctypes.CDLL):
        self.weights = head.detach().contiguous()
        self.screen = PackedMatrix(self.weights, library, bfloat16=True)
        wide = self.weights.double()
        rounded = self.weights.to(torch.bfloat16).double()
        k, unit = self.weights.shape[1], 2.0**-24
        norms = torch.maximum(wide.norm(dim=1), rounded.norm(dim=1))
        slack = (wide - rounded).norm(dim=1) + (2 * k * unit / (1 - k * unit) + 8 * unit) * norms
        self.slack = (slack * 1.01).float().contiguous()
        self._library = library

    def __call__(self, hidden: torch.Tensor) -> tuple[list[int], list[int]]:
        """hidden (R, K) float32 -> (the argmax column of each row, candidates recomputed per row)."""
        rows = hidden.reshape(-1, self.weights.shape[1]).contiguous()
        approx = self.screen(rows)
        best = torch.empty(rows.shape[0], dtype=torch.long)
        candidates = torch.empty(rows.shape[0], dtype=torch.int32)
        self._library.head_argmax(
            rows.data_ptr(), rows.shape[0], rows.shape[1], approx.data_ptr(), approx.shape[1],
            self.slack.data_ptr(), self.weights.data_ptr(), best.data_ptr(), candidates.data_ptr(),
            torch.get_num_threads(),
        )
        return best.tolist(), candidates.tolist()


def fits(*tensors: torch.Tensor) -> bool:
    """Whether the row kernels may take these tensors: contiguous float32 on the CPU, no autograd."""
    if load_library() is None:
        return False
    grad = torch.is_grad_enabled()
    return all(
        t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() and not (grad and t.requires_grad)
        for t in tensors
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., d) / rms * weight, for `fits` tensors with d a multiple of 8."""
    out = torch.empty_like(x)
    rows = x.numel() // x.shape[-1]
    load_library().rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, x.shape[-1], ctypes.c_float(eps))
    return out


def rotary(qkv: torch.Tensor, heads: int, head_dim: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate the first `heads` heads (queries, then keys) of each fused q/k/v row of qkv (..., R, W)
    in place; cos and sin (R, head_dim); head_dim a multiple of 16."""
    rows = qkv.numel() // qkv.shape[-1]
    load_library().rotary(
        qkv.data_ptr(), rows, qkv.shape[-1], heads, head_dim, cos.data_ptr(), sin.data_ptr(), cos.shape[0]
    )


def pack(weight: torch.Tensor, bfloat16: bool = False) -> PackedMatrix | None:
    """The weight packed for the kernel, or None where the kernel does not apply to it."""
    library = _library_for(weight)
    return None if library is None else PackedMatrix(weight, library, bfloat16)


def exact_argmax(head: torch.Tensor) -> ExactArgmax | None:
    """The screened argmax over this LM head, or None where the kernel does not apply to it."""
    library = _library_for(head)
    return None if library is None else ExactArgmax(head, library)


def _library_for(weight: torch.Tensor) -> ctypes.CDLL | None:
    if weight.device.type != "cpu" or weight.dtype != torch.float32 or weight.requires_grad or weight.dim() != 2:
        return None
    return load_library()


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled kernel, built once per source version; None (with a warning) where it cannot be."""
    reason = _unsupported_reason()
    if reason:
        if os.environ.get("SPECSTREAM_CPU_KERNELS") != "0":
            warnings.warn(f"CPU kernels off ({reason}); using torch", stacklevel=2)
        return None
    try:
        library = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.CalledProcessError) as error:
        warnings.warn(f"CPU kernels could not be built ({error}); using torch", stacklevel=2)
        return None
    pointer, integer = ctypes.c_void_p, ctypes.c_int
    library.small_gemm.argtypes = [pointer, integer, integer, pointer, integer, pointer, integer]
    library.small_gemm_avx2.argtypes = library.small_gemm.argtypes
    library.small_gemm_bf16.argtypes = library.small_gemm.argtypes
    library.head_argmax.argtypes = [pointer, integer, integer, pointer, integer, pointer, pointer, pointer, pointer, integer]
    library.rms_norm.argtypes = [pointer, pointer, pointer, integer, integer, ctypes.c_float]
    library.rotary.argtypes = [pointer, integer, integer, integer, integer, pointer, pointer, integer]
    for function in (library.small_gemm, library.small_gemm_avx2, library.small_gemm_bf16, library.head_argmax,
                     library.rms_norm, library.rotary):
        function.restype = None
    return library


def _unsupported_reason() -> str | None:
    if os.environ.get("SPECSTREAM_CPU_KERNELS") == "0":
        return "SPECSTREAM_CPU_KERNELS=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"{platform.machine()} is not x86-64"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "this CPU has no AVX2"
    return None


def _build() -> Path:
    compiler = os.environ.get("CC", "cc")
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    target = _cache_dir() / f"cpu_kernels-{digest}.so"
    if not target.exists():
        # Build beside the target and rename: concurrent processes never load a half-written file.
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], check=True, capture_output=True)
            os.replace(built, target)
    return target


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    for folder in (Path(base) / "specstream", Path(tempfile.gettempdir()) / f"specstream-{os.getuid()}"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
        except OSError:
            continue
    raise OSError("no writable cache folder for the compiled kernel")
