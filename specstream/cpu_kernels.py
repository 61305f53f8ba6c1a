"""Float32 decoding kernels for x86 CPUs with AVX2, in `cpu_kernels.c`.

Why: a draft tree is a handful of rows, and on the 2-core AMD EPYC we measure on, MKL's fp32 GEMM
with 2-16 rows costs 2-3x its 1-row cost, so a tree pass cost far more than the tokens it won.
`small_gemm` streams each weight tile from memory once for all rows: SmolLM2-135M's 30-layer body
matmuls took 38 ms (1 row), 70 ms (4), 72 ms (16) with MKL and 18, 22, 36 ms with it. On CPUs with
AVX-512 (the 2-core Intel Xeons here) a wider variant takes 16 rows per read of the weights: body
1 / 8 / 12 / 16 rows 25.6 / 31.3 / 34.9 / 43.2 ms with the AVX2 path, 23.0 / 24.8 / 27.1 / 30.0 with it. Once the
matmuls were fast, the small torch ops between them (about sixty a layer, a few microseconds of
dispatch each) were a third of a pass; `rms_norm` and `rotary` do their rows in one call each.
Then the LM head was the biggest single read of a one-row pass: `ExactArgmax` finds the greedy token
from a bfloat16 copy (in AMX tiles where the CPU has them) and recomputes only the few columns a proven
bound cannot rule out. Attention over the KV cache (`attend_rows`) took 80 microseconds a layer in
torch for one row; in C about 20, and a row's result depends only on the keys it sees, so a tree node's
attention is the same bits as plain decoding's at that token. Last, `decoder_layer_rows` runs a whole
layer (with the stream adapter's low-rank pairs) in one call: the dozen calls and torch ops between
the matmuls cost about 100 microseconds a layer, and plain decoding went from 25.5 to 34.3 tokens/s;
`decoder_layers_rows` then takes a run of layers per call (about 70 microseconds a layer from Python).
Opt-in (`SPECSTREAM_EXACT_4BIT=1`), `q4_gemm` reads weights that are exact 4-bit codes (a GGUF Q4_1
body) as those codes, with the float32 path's bits.

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


class Int8Matrix:
    """A float32 CPU weight (N, K) as int8 with a scale per row of W (its largest magnitude over 127),
    multiplied in AMX tiles with the rows rounded to int8 the same way: a quarter of float32's bytes,
    logits off by about 1 % of |x| |w|. For ranking drafts only; CPUs with AMX, K a multiple of 64."""

    def __init__(self, weight: torch.Tensor, library: ctypes.CDLL):
        self.out_features, self.in_features = weight.shape
        tiles = -(-self.out_features // TILE)
        self.scales = torch.ones(tiles * TILE, dtype=torch.float32)
        padded = torch.zeros(tiles * TILE, self.in_features, dtype=torch.int8)
        self.scales[: self.out_features], padded[: self.out_features] = int8_rows(weight.detach().contiguous())
        quads = padded.view(tiles, TILE, self.in_features // 4, 4)
        self.packed = quads.transpose(1, 2).contiguous()  # (tiles, K / 4, 16, 4): AMX's layout
        self._library = library

    accepts = PackedMatrix.accepts  # the same rows: float32 on the CPU, no autograd

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        row_scales, rows = int8_rows(x.reshape(-1, self.in_features).contiguous())
        out = torch.empty(rows.shape[0], self.out_features, dtype=torch.float32)
        self._library.amx_int8_gemm(
            rows.data_ptr(), rows.shape[0], self.in_features, self.packed.data_ptr(), row_scales.data_ptr(),
            self.scales.data_ptr(), self.out_features, out.data_ptr(), torch.get_num_threads(),
        )
        return out.view(*x.shape[:-1], self.out_features)


class Q4Matrix:
    """A float32 CPU weight (N, K) whose every value is exactly d * q + m with q in 0..15 and d, m one pair
    per 32 k of a row (a GGUF Q4_1 weight de-quantized), kept as those codes for `q4_gemm`: 5/32 of the
    bytes, the same products bit for bit."""

    BLOCK = 32

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor):
        """codes (N, K) uint8 in 0..15; scale and offset (N, K / 32) float32."""
        (self.out_features, self.in_features), tiles = codes.shape, -(-codes.shape[0] // TILE)
        padded = codes.new_zeros(tiles * TILE, self.in_features)
        padded[: self.out_features] = codes
        pairs = padded[:, 0::2] | (padded[:, 1::2] << 4)  # (N', K / 2): k even low, k + 1 high
        self.codes = pairs.view(tiles, TILE, -1).transpose(1, 2).contiguous()  # (tiles, K / 2, 16)
        both = torch.zeros(tiles * TILE, 2, scale.shape[1], dtype=torch.float32)
        both[: self.out_features, 0], both[: self.out_features, 1] = scale, offset
        self.scales = both.view(tiles, TILE, 2, -1).permute(0, 3, 2, 1).contiguous()  # (tiles, K / 32, 2, 16)


def q4_matrix(weight: torch.Tensor) -> Q4Matrix | None:
    """The weight as 4-bit codes where every value is exactly one (checked value by value) and the CPU has
    AVX-512; else None."""
    rows, width = weight.shape if weight.dim() == 2 else (0, 0)
    if _library_for(weight) is None or width % Q4Matrix.BLOCK or torch.backends.cpu.get_cpu_capability() != "AVX512":
        return None
    blocks = weight.detach().view(rows, width // Q4Matrix.BLOCK, Q4Matrix.BLOCK)
    offset, top = blocks.amin(dim=-1), blocks.amax(dim=-1)
    # Q4_1 maps a block's least value to 0 and its greatest to 15, so m is the least value and d, a
    # half-precision number, is within a unit in the last place of (greatest - least) / 15.
    estimate = ((top.double() - offset.double()) / 15).half()
    found = torch.zeros_like(offset, dtype=torch.bool)
    scale, codes = torch.zeros_like(offset), torch.zeros_like(blocks, dtype=torch.uint8)
    for step in (0, 1, -1):
        candidate = (estimate.view(torch.int16) + step).view(torch.float16).float()
        candidate = torch.where(top > offset, candidate, torch.zeros_like(candidate))
        safe = torch.where(candidate > 0, candidate, torch.ones_like(candidate))[..., None]
        q = torch.round((blocks - offset[..., None]) / safe).clamp(0, 15)
        exact = ((q * candidate[..., None] + offset[..., None]) == blocks).all(dim=-1) & ~found
        scale, codes = torch.where(exact, candidate, scale), torch.where(exact[..., None], q.to(torch.uint8), codes)
        found |= exact
    if not bool(found.all()):
        return None
    return Q4Matrix(codes.view(rows, width), scale, offset)


def int8_rows(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each of contiguous float32 CPU rows (R, K) as int8 times a scale, in one C call: (scales (R,), int8
    rows (R, K)); the scale is the row's largest magnitude (at least 1e-30) over 127, rounding to even."""
    scales = torch.empty(matrix.shape[0], dtype=torch.float32)
    rows = torch.empty(matrix.shape, dtype=torch.int8)
    load_library().int8_rows(matrix.data_ptr(), matrix.shape[0], matrix.shape[1], rows.data_ptr(), scales.data_ptr())
    return scales, rows


def top_probabilities(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, columns), each (R, k): the k largest logits of each row of float32 CPU logits (R, N) that `fits` takes
    (k at most N and 64), best first, with their softmax probabilities over the row."""
    rows, width = logits.shape
    probs = torch.empty(rows, k, dtype=torch.float32)
    columns = torch.empty(rows, k, dtype=torch.long)
    load_library().top_probabilities(logits.data_ptr(), rows, width, k, probs.data_ptr(), columns.data_ptr())
    return probs, columns


def pack_draft_head(weight: torch.Tensor) -> Int8Matrix | PackedMatrix | None:
    """The streams' draft head for the kernel: int8 in AMX tiles where the CPU has them, else bfloat16
    (None where the kernel does not apply)."""
    library = _library_for(weight)
    if library is None:
        return None
    if library.amx and weight.shape[1] % 64 == 0:
        return Int8Matrix(weight, library)
    return PackedMatrix(weight, library, bfloat16=True)


class ExactArgmax:
    """Greedy decoding's argmax over an LM head (V, K): the same token as `argmax` of the float32
    kernel's logits, reading half the bytes. A bfloat16 copy of the head screens the columns (with the
    rows rounded to bfloat16 too and multiplied in AMX tiles where the CPU has them: a tree's rows made
    the widening screen compute-bound), and only the columns within a proven error bound of the best
    are recomputed in float32 (`head_argmax` in C). The float32 head took 7.0 ms of a one-row pass of
    about 40 on a 2-core Xeon.

    Bound, per column i and row x, with x~ and w~ their bfloat16 roundings (Cauchy-Schwarz):
    |x~ . w~ - x . w| <= |x - x~| |w~| + |x| |w - w~|, and a float32 dot product of n exact products
    (those of bfloat16 values are exact in float32) is within n u / (1 - n u) of the sum of their
    magnitudes (u = 2^-24), here n = 4K whatever order the hardware sums in. `slack` holds |w - w~|
    plus those rounding terms per |x|, `norms` |w~|, each with a 1 % margin; |x| and |x - x~| come per
    call."""

    def __init__(self, head: torch.Tensor, library: ctypes.CDLL, screen: str | None = None):
        self.weights = head.detach().contiguous()
        (vocab, k), self._library = self.weights.shape, library
        rounded = self.weights.to(torch.bfloat16)
        self.screen_way = screen or screen_way(library, k)
        self.tiles = self.screen_way != "widening"
        if self.tiles:
            count = -(-vocab // TILE)
            padded = rounded.new_zeros(count * TILE, k)
            padded[:vocab] = rounded
            self.packed = padded.view(count, TILE, k // 2, 2).transpose(1, 2).contiguous().view(torch.int16)
        else:
            self.screen = PackedMatrix(self.weights, library, bfloat16=True)
        wide, narrow = self.weights.double(), rounded.double()
        unit, terms = 2.0**-24, 4 * k
        rounding = 2 * terms * unit / (1 - terms * unit) + 8 * unit
        largest = torch.maximum(wide.norm(dim=1), narrow.norm(dim=1))
        self.slack = ((wide - narrow).norm(dim=1) + rounding * largest + 1e-30).mul(1.01).float().contiguous()
        self.norms = narrow.norm(dim=1).mul(1.01).float().contiguous()

    def __call__(self, hidden: torch.Tensor) -> tuple[list[int], list[int]]:
        """hidden (R, K) float32 -> (the argmax column of each row, candidates recomputed per row)."""
        rows = hidden.reshape(-1, self.weights.shape[1]).contiguous()
        approx, moved = self._screen(rows)
        scales = torch.stack([rows.double().norm(dim=1), moved], dim=1).mul(1.0001).float().contiguous()
        best = torch.empty(rows.shape[0], dtype=torch.long)
        candidates = torch.empty(rows.shape[0], dtype=torch.int32)
        self._library.head_argmax(
            rows.data_ptr(), rows.shape[0], rows.shape[1], approx.data_ptr(), approx.shape[1], scales.data_ptr(),
            self.slack.data_ptr(), self.norms.data_ptr(), self.weights.data_ptr(), best.data_ptr(),
            candidates.data_ptr(), torch.get_num_threads(),
        )
        return best.tolist(), candidates.tolist()

    def _screen(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The screened logits (R, V), and how far rounding each row to bfloat16 moved it."""
        if not self.tiles:
            return self.screen(rows), torch.zeros(rows.shape[0], dtype=torch.float64)
        narrow = rows.to(torch.bfloat16)
        moved = (rows.double() - narrow.double()).norm(dim=1)
        out = torch.empty(rows.shape[0], self.weights.shape[0], dtype=torch.float32)
        gemm = self._library.amx_gemm if self.screen_way == "amx" else self._library.bf16_dot_gemm
        gemm(
            narrow.view(torch.int16).data_ptr(), rows.shape[0], rows.shape[1], self.packed.data_ptr(),
            self.weights.shape[0], out.data_ptr(), torch.get_num_threads(),
        )
        return out, moved


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


# False runs decoder layers op by op in torch even where the whole-layer kernel applies (tests, A/B).
WHOLE_LAYERS = True
# Whether the whole-layer kernel reads weights that are exact 4-bit codes (Q4Matrix) as those codes. Off by
# default: it makes plain decoding about twice as fast on a 2-core Xeon but a tree's rows cost their
# arithmetic, so speculation gains far less there (README). SPECSTREAM_EXACT_4BIT=1 turns it on.
EXACT_4BIT = os.environ.get("SPECSTREAM_EXACT_4BIT") == "1"


def lora_add(x: torch.Tensor, down: PackedMatrix, up: PackedMatrix, y: torch.Tensor) -> None:
    """y (M, N) += up(down(x (M, K))), in place, for `fits` tensors."""
    load_library().lora_add(
        x.data_ptr(), x.shape[0], x.shape[1], down.packed.data_ptr(), down.out_features, up.packed.data_ptr(),
        up.out_features, y.data_ptr(), torch.get_num_threads(), int(down.bfloat16),
    )


# The order of a layer's projections in `decoder_layer_rows`.
PROJECTIONS = ("qkv", "o", "gate_up", "down")


class _LayerWeights(ctypes.Structure):
    _fields_ = [("d", ctypes.c_int), ("heads", ctypes.c_int), ("kv_heads", ctypes.c_int), ("head_dim", ctypes.c_int),
                ("ff", ctypes.c_int), ("eps", ctypes.c_float), ("input_norm", ctypes.c_void_p),
                ("post_norm", ctypes.c_void_p), ("projection", ctypes.c_void_p * 4), ("codes", ctypes.c_void_p * 4),
                ("scales", ctypes.c_void_p * 4)]


class _LayerLora(ctypes.Structure):
    _fields_ = [("rank", ctypes.c_int * 4), ("down", ctypes.c_void_p * 4), ("up", ctypes.c_void_p * 4),
                ("bf16", ctypes.c_int)]


class LoraKernel:
    """One layer's packed low-rank pairs (by projection name, any subset) as `decoder_layer_rows` takes them."""

    def __init__(self, pairs: dict[str, tuple[PackedMatrix, PackedMatrix]]):
        self._pairs = pairs  # the structure points into their packed tensors
        self.struct = _LayerLora()
        for index, name in enumerate(PROJECTIONS):
            if name in pairs:
                down, up = pairs[name]
                self.struct.rank[index] = down.out_features
                self.struct.down[index], self.struct.up[index] = down.packed.data_ptr(), up.packed.data_ptr()
                self.struct.bf16 = int(down.bfloat16)


class LayerKernel:
    """A decoder layer's packed weights as `decoder_layer_rows` takes them (through `LayerStack`): a decoding
    pass's rows through the whole layer in C (its dozen torch ops and kernel calls cost about 100 us of
    dispatch a layer)."""

    def __init__(self, packed: dict[str, PackedMatrix], input_norm: torch.Tensor, post_norm: torch.Tensor, heads: int,
                 kv_heads: int, head_dim: int, eps: float, codes: dict[str, Q4Matrix] | None = None):
        codes = codes or {}
        self._keep = (packed, input_norm, post_norm, codes)  # the structure points into them
        self.struct = _LayerWeights(
            input_norm.shape[0], heads, kv_heads, head_dim, packed["down"].in_features, eps, input_norm.data_ptr(),
            post_norm.data_ptr(), (ctypes.c_void_p * 4)(*(packed[name].packed.data_ptr() for name in PROJECTIONS)),
            (ctypes.c_void_p * 4)(*(codes[name].codes.data_ptr() if name in codes else None for name in PROJECTIONS)),
            (ctypes.c_void_p * 4)(*(codes[name].scales.data_ptr() if name in codes else None for name in PROJECTIONS)),
        )
        self.head_dim = head_dim

    def fits(self, x: torch.Tensor, cos: torch.Tensor, keys: torch.Tensor, bias: torch.Tensor | None, span: int) -> bool:
        """Whether it may take rows x (R, d) with rotary tables cos (R, head_dim), this cache and bias."""
        rows = x.shape[0]
        return (
            x.dim() == 2
            and WHOLE_LAYERS
            and rows > 0
            and cos.shape == (rows, self.head_dim)
            and (bias is None or (bias.shape == (rows, span) and bias.dtype == torch.float32))
            and fits(x, cos, keys, *(() if bias is None else (bias,)))
        )


class LayerStack:
    """Consecutive layers' kernels (each with its low-rank pairs or None) as one call of
    `decoder_layers_rows`: the rows through all of them in place. A layer's call from Python cost about
    70 us of argument checks and ctypes around 770 of arithmetic (2-core Xeon): 2 ms of a plain pass."""

    def __init__(self, kernels: list[LayerKernel], loras: list[LoraKernel | None]):
        self._keep = (kernels, loras)  # the arrays point into their structures
        self.layers, self.head_dim = len(kernels), kernels[0].head_dim
        self._structs = (ctypes.c_void_p * len(kernels))(*(ctypes.addressof(k.struct) for k in kernels))
        self._loras = None
        if any(loras):
            self._loras = (ctypes.c_void_p * len(loras))(*(None if lora is None else ctypes.addressof(lora.struct) for lora in loras))

    def __call__(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 slots: int | torch.Tensor, span: int, bias: torch.Tensor | None, first_row: int = 0) -> torch.Tensor:
        """Rows x (R, d) -> (R, d) through the layers; keys and values (layers, 1, kv_heads, capacity,
        head_dim) from the first of them, as KVCache holds them."""
        start, indices = _slot_arguments(slots)
        out = x.clone()
        load_library().decoder_layers_rows(
            self._structs, self._loras, self.layers, first_row, out.data_ptr(), x.shape[0], cos.data_ptr(),
            sin.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(2), start,
            None if indices is None else indices.data_ptr(), span, None if bias is None else bias.data_ptr(),
            torch.get_num_threads(),
        )
        return out


def _slot_arguments(slots: int | torch.Tensor) -> tuple[int, torch.Tensor | None]:
    """Cache slots as the kernels take them: (a start slot, None), or (0, slot indices as long)."""
    if isinstance(slots, int):
        return slots, None
    return 0, slots.to(torch.long).contiguous()


def layer_kernel(packed: dict[str, PackedMatrix], input_norm: torch.Tensor, post_norm: torch.Tensor, heads: int,
                 kv_heads: int, head_dim: int, eps: float, codes: dict[str, Q4Matrix] | None = None) -> LayerKernel | None:
    """The whole-layer kernel for these weights, or None where it does not apply (a projection not
    packed, or sizes the row kernels do not take)."""
    if set(packed) != set(PROJECTIONS):
        return None
    if input_norm.shape[0] % 8 or packed["down"].in_features % 8 or head_dim % 16 or head_dim > 256:
        return None
    if heads % kv_heads or heads // kv_heads > 64 or not fits(input_norm, post_norm):
        return None
    return LayerKernel(packed, input_norm, post_norm, heads, kv_heads, head_dim, eps, codes)


def write_kv(qkv: torch.Tensor, heads: int, head_dim: int, keys: torch.Tensor, values: torch.Tensor,
             slots: int | torch.Tensor) -> None:
    """Copy the keys and values of fused q/k/v rows qkv (R, W) into cache slots (a start slot, or R
    slot indices) of keys and values (kv_heads, capacity, head_dim)."""
    start, indices = _slot_arguments(slots)
    load_library().write_kv(
        qkv.data_ptr(), qkv.shape[0], qkv.shape[1], heads, keys.shape[0], head_dim, start,
        None if indices is None else indices.data_ptr(), keys.data_ptr(), values.data_ptr(), keys.stride(0),
    )


def attend_rows(qkv: torch.Tensor, heads: int, head_dim: int, keys: torch.Tensor, values: torch.Tensor, span: int,
                bias: torch.Tensor | None) -> torch.Tensor:
    """Attention of the query heads of fused q/k/v rows qkv (R, W) over cache slots [0, span) of keys
    and values (kv_heads, capacity, head_dim), with an additive bias (R, span) of 0 and -inf or none:
    (R, heads * head_dim). A row's result depends only on the keys it sees, in slot order."""
    out = torch.empty(qkv.shape[0], heads * head_dim, dtype=torch.float32)
    load_library().attend_rows(
        qkv.data_ptr(), qkv.shape[0], qkv.shape[1], heads, keys.shape[0], head_dim, keys.data_ptr(), values.data_ptr(),
        keys.stride(0), span, None if bias is None else bias.data_ptr(), ctypes.c_float(head_dim**-0.5), out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


def pack(weight: torch.Tensor, bfloat16: bool = False) -> PackedMatrix | None:
    """The weight packed for the kernel, or None where the kernel does not apply to it."""
    library = _library_for(weight)
    return None if library is None else PackedMatrix(weight, library, bfloat16)


def screen_way(library: ctypes.CDLL, k: int) -> str:
    """How `ExactArgmax` screens a head of k inputs: bfloat16 "amx" tiles, AVX512-BF16 "dot" products of the
    same packed pairs, or bfloat16 weights "widening" to float32 (any AVX2 CPU)."""
    if library.amx and k % 32 == 0:
        return "amx"
    return "dot" if library.bf16_dot and k % 2 == 0 else "widening"


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
    library.head_argmax.argtypes = [pointer, integer, integer, pointer, integer, pointer, pointer, pointer, pointer,
                                    pointer, pointer, integer]
    library.amx_gemm.argtypes = [pointer, integer, integer, pointer, integer, pointer, integer]
    library.amx_ready.argtypes = []
    library.amx_ready.restype = integer
    library.bf16_dot_gemm.argtypes = library.amx_gemm.argtypes
    library.bf16_dot_ready.argtypes = []
    library.bf16_dot_ready.restype = integer
    library.rms_norm.argtypes = [pointer, pointer, pointer, integer, integer, ctypes.c_float]
    library.rotary.argtypes = [pointer, integer, integer, integer, integer, pointer, pointer, integer]
    wide = ctypes.c_long
    library.amx_int8_gemm.argtypes = [pointer, integer, integer, pointer, pointer, pointer, integer, pointer, integer]
    library.lora_add.argtypes = [pointer, integer, integer, pointer, integer, pointer, integer, pointer, integer, integer]
    library.q4_gemm.argtypes = [pointer, integer, integer, pointer, pointer, integer, pointer, integer]
    library.int8_rows.argtypes = [pointer, integer, integer, pointer, pointer]
    library.top_probabilities.argtypes = [pointer, integer, integer, integer, pointer, pointer]
    library.decoder_layers_rows.argtypes = [pointer, pointer, integer, integer, pointer, integer, pointer, pointer,
                                            pointer, pointer, wide, wide, wide, pointer, integer, pointer, integer]
    library.attend_rows.argtypes = [pointer, integer, integer, integer, integer, integer, pointer, pointer, wide, integer,
                                    pointer, ctypes.c_float, pointer, integer]
    library.write_kv.argtypes = [pointer, integer, integer, integer, integer, integer, wide, pointer, pointer, pointer, wide]
    for function in (library.small_gemm, library.small_gemm_avx2, library.small_gemm_bf16, library.amx_int8_gemm, library.head_argmax,
                     library.amx_gemm, library.rms_norm, library.rotary, library.attend_rows, library.write_kv,
                     library.lora_add, library.decoder_layers_rows, library.int8_rows, library.q4_gemm,
                     library.top_probabilities, library.bf16_dot_gemm):
        function.restype = None
    library.amx = bool(library.amx_ready()) and os.environ.get("SPECSTREAM_AMX") != "0"
    library.bf16_dot = bool(library.bf16_dot_ready()) and os.environ.get("SPECSTREAM_BF16_DOT") != "0"
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
