"""The stream adapter: everything Speculative Streaming adds to a base model, in one file pair.

`adapter.safetensors` holds the weights, `adapter.json` the config, including the identity of the
base model it was trained for. Nothing is ever loaded with pickle.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .llama import LlamaShape

WEIGHTS_FILE = "adapter.safetensors"
CONFIG_FILE = "adapter.json"
LORA_TARGETS = ("qkv", "o", "gate_up", "down")
MODES = ("lossless", "shared")


class AdapterError(ValueError):
    """A missing, damaged or mismatched adapter, with a message a user can act on."""


@dataclass(frozen=True)
class BaseIdentity:
    """Which base model an adapter fits: it is refused on any other."""

    name: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    vocab_hash: str


@dataclass(frozen=True)
class AdapterConfig:
    base: BaseIdentity
    gamma: int = 3  # speculative streams; the paper uses up to 4
    stream_layers: int = 4  # N_s, the top layers with multi-stream attention (paper: 1/6 to 1/2)
    lora_rank: int = 32  # the paper's LoRA rank
    lora_alpha: float = 32.0
    lora_targets: tuple[str, ...] = LORA_TARGETS
    prune_rank: int = 8  # the paper's rank-8 early-exit map
    mode: str = "lossless"  # lossless: adapters touch stream rows only; shared: every row of the top layers
    # P_j = stream_scale * (stored embedding). Training sets it to the typical RMS of the hidden state
    # at the first stream layer (about 20 in SmolLM2-135M, whose rows have norms near 450): stored at
    # unit scale, the embeddings learned too slowly to tell the streams apart.
    stream_scale: float = 1.0
    # Tokens the streams may propose (their LM head's rows, see draft_vocab.py); 0 = the full vocabulary.
    draft_vocab_size: int = 0
    # Rank of the map from the next token's embedding into every stream row; 0 = off. With it the
    # streams of a node also see the token verification chose after it (the bonus token), as
    # EAGLE's draft sees its last token: they can then only run after verification, in the short
    # second pass over the top layers.
    bonus_rank: int = 0

    def __post_init__(self) -> None:
        problems = []
        if not 1 <= self.gamma <= 8:
            problems.append(f"gamma must be 1 to 8, not {self.gamma}")
        if not 1 <= self.stream_layers < self.base.num_layers:
            problems.append(f"stream_layers must be 1 to {self.base.num_layers - 1}, not {self.stream_layers}")
        if not 0 < self.stream_scale < 1e4:
            problems.append(f"stream_scale must be positive, not {self.stream_scale}")
        if not 0 <= self.draft_vocab_size <= self.base.vocab_size:
            problems.append(f"draft_vocab_size must be 0 (full) to {self.base.vocab_size}, not {self.draft_vocab_size}")
        if self.lora_rank < 0 or self.prune_rank < 0 or self.bonus_rank < 0:
            problems.append("ranks must not be negative")
        if set(self.lora_targets) - set(LORA_TARGETS):
            problems.append(f"lora_targets must be among {LORA_TARGETS}, not {list(self.lora_targets)}")
        if self.mode not in MODES:
            problems.append(f"mode must be one of {MODES}, not '{self.mode}'")
        if problems:
            raise AdapterError("invalid adapter config: " + "; ".join(problems))

    @property
    def lossless(self) -> bool:
        return self.mode == "lossless"

    def to_json(self) -> dict:
        data = asdict(self)
        data["lora_targets"] = list(self.lora_targets)
        return data

    @classmethod
    def from_json(cls, data: dict) -> AdapterConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise AdapterError(f"adapter config has unknown fields {sorted(unknown)}")
        try:
            base = BaseIdentity(**data["base"])
            rest = {k: v for k, v in data.items() if k != "base"}
            if "lora_targets" in rest:
                rest["lora_targets"] = tuple(rest["lora_targets"])
            return cls(base=base, **rest)
        except (KeyError, TypeError) as error:
            raise AdapterError(f"adapter config is incomplete or malformed: {error}") from None


def projection_sizes(shape: LlamaShape) -> dict[str, tuple[int, int]]:
    """(in, out) features of each fused projection of a layer."""
    d, hd = shape.hidden_size, shape.head_dim
    return {
        "qkv": (d, (shape.num_heads + 2 * shape.num_kv_heads) * hd),
        "o": (shape.num_heads * hd, d),
        "gate_up": (d, 2 * shape.intermediate_size),
        "down": (shape.intermediate_size, d),
    }


class StreamAdapter(nn.Module):
    """Stream identifier embeddings, low-rank adapters for the top layers, and the pruning map."""

    def __init__(self, config: AdapterConfig, shape: LlamaShape):
        super().__init__()
        self.config = config
        d = shape.hidden_size
        # Random embeddings about a third the size of a hidden state (given a fitting stream_scale),
        # so that even a fresh adapter's streams differ from the main stream and from one another.
        self.stream_embeddings = nn.Parameter(torch.randn(config.gamma, d) * 0.3)  # (gamma, d)
        self.lora_down = nn.ParameterDict()
        self.lora_up = nn.ParameterDict()
        sizes = projection_sizes(shape)
        for layer in range(config.stream_layers):
            for target in config.lora_targets:
                fan_in, fan_out = sizes[target]
                key = f"{layer}_{target}"
                self.lora_down[key] = nn.Parameter(torch.randn(config.lora_rank, fan_in) / math.sqrt(fan_in))
                self.lora_up[key] = nn.Parameter(torch.zeros(fan_out, config.lora_rank))  # starts as a no-op
        self.prune_down = nn.Parameter(torch.randn(config.prune_rank, d) / math.sqrt(d))
        self.prune_up = nn.Parameter(torch.zeros(d, config.prune_rank))
        if config.bonus_rank:
            self.bonus_down = nn.Parameter(torch.randn(config.bonus_rank, d) / math.sqrt(d))
            self.bonus_up = nn.Parameter(torch.zeros(d, config.bonus_rank))  # starts as a no-op
        if config.draft_vocab_size:
            self.register_buffer("draft_vocab", torch.arange(config.draft_vocab_size))  # sorted token ids

    @property
    def draft_ids(self) -> torch.Tensor | None:
        """The draft vocabulary's token ids, or None for the full vocabulary."""
        return self.draft_vocab if self.config.draft_vocab_size else None

    def stream_identity(self, count: int) -> torch.Tensor:
        """The first `count` stream identifier embeddings P_j, (count, d)."""
        return self.stream_embeddings[:count] * self.config.stream_scale

    def bonus_shift(self, embedded: torch.Tensor) -> torch.Tensor:
        """What the next token adds to its node's stream rows, from its input embedding (..., d):
        normalised to unit RMS and brought to the hidden state's scale, as the stream identities are."""
        unit = embedded * torch.rsqrt(embedded.pow(2).mean(-1, keepdim=True) + 1e-6)
        return ((unit @ self.bonus_down.T) @ self.bonus_up.T) * self.config.stream_scale

    @property
    def lora_scale(self) -> float:
        return self.config.lora_alpha / max(self.config.lora_rank, 1)

    def pruning_map(self, hidden: torch.Tensor) -> torch.Tensor:
        """The early-exit map h + up(down(h)); the base LM head reads its output."""
        return hidden + (hidden @ self.prune_down.T) @ self.prune_up.T


def base_identity(name: str, shape: LlamaShape, vocab_hash: str) -> BaseIdentity:
    return BaseIdentity(name, shape.num_layers, shape.hidden_size, shape.vocab_size, vocab_hash)


def save_adapter(adapter: StreamAdapter, folder: str | Path, extra_metadata: dict | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: (t.float() if t.is_floating_point() else t).detach().cpu().contiguous()
               for name, t in adapter.state_dict().items()}
    save_file(tensors, str(folder / WEIGHTS_FILE))
    config = adapter.config.to_json() | ({"training": extra_metadata} if extra_metadata else {})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def _read_config(folder: Path) -> AdapterConfig:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"adapter config {path} is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AdapterError(f"adapter config {path} is not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise AdapterError(f"adapter config {path} must be a JSON object")
    data.pop("training", None)
    return AdapterConfig.from_json(data)


def _check_base(config: AdapterConfig, expected: BaseIdentity) -> None:
    for field in ("num_layers", "hidden_size", "vocab_size", "vocab_hash"):
        have, want = getattr(config.base, field), getattr(expected, field)
        if have != want:
            raise AdapterError(
                f"this adapter was trained for '{config.base.name}' ({field} {have}), "
                f"but the loaded model is '{expected.name}' ({field} {want})"
            )


def _check_draft_vocab(ids: torch.Tensor, vocab_size: int, path: Path) -> None:
    if ids.is_floating_point() or ids.min() < 0 or ids.max() >= vocab_size or len(ids.unique()) != len(ids):
        raise AdapterError(f"adapter tensor draft_vocab in {path} must hold distinct token ids below {vocab_size}")


def adapter_folder(path: str | Path) -> Path:
    """The adapter folder of a folder, or of its weights or config file."""
    folder = Path(path)
    return folder.parent if folder.suffix == ".safetensors" or folder.name == CONFIG_FILE else folder


def load_adapter(path: str | Path, shape: LlamaShape, expected: BaseIdentity) -> StreamAdapter:
    """Load and validate an adapter folder (or its .safetensors file)."""
    folder = adapter_folder(path)
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist")
    config = _read_config(folder)
    _check_base(config, expected)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterError(f"adapter weights {weights_path} are missing")
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterError(f"adapter weights {weights_path} are truncated or corrupt ({error})") from None
    adapter = StreamAdapter(config, shape)
    expected_shapes = {name: t.shape for name, t in adapter.state_dict().items()}
    missing = sorted(set(expected_shapes) - set(tensors))
    if missing:
        raise AdapterError(f"adapter weights {weights_path} lack {len(missing)} tensors, e.g. {missing[0]}")
    for name, tensor in tensors.items():
        if name not in expected_shapes:
            raise AdapterError(f"adapter weights {weights_path} hold an unexpected tensor {name}")
        if tensor.shape != expected_shapes[name]:
            raise AdapterError(
                f"adapter tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(expected_shapes[name])}"
            )
        if not torch.isfinite(tensor).all():
            raise AdapterError(f"adapter tensor {name} holds NaN or infinite values")
    if config.draft_vocab_size:
        _check_draft_vocab(tensors["draft_vocab"], shape.vocab_size, weights_path)
    adapter.load_state_dict(tensors)
    return adapter
