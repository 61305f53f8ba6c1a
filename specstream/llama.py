"""A compact Llama forward pass whose attention mask and positions are explicit arguments.

We do not build on `transformers`' cache and mask classes: they change between releases and,
on a small CPU, cost about a third of a single-token pass in Python overhead. The weights are
plain tensors (q/k/v and gate/up fused, so each layer runs four matmuls), and every layer
function works on a batch of rows `(B, R, d)` whose keys and values come from a caller-given
`kv` function: the KV cache at inference, precomputed main-stream keys during training.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, fields
from functools import cached_property, wraps
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import cpu_kernels
from .cpu_kernels import PackedMatrix, pack
from .kv_cache import KVCache

# Rotary types whose frequencies depend on the sequence length at run time; our cached
# cos/sin table cannot follow them, so we refuse them rather than be silently wrong.
_DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")
PROJECTIONS = ("qkv", "o", "gate_up", "down")


@dataclass(frozen=True)
class LlamaShape:
    """The numbers of a Llama-family checkpoint that the forward pass needs."""

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    max_positions: int
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_config(cls, config) -> LlamaShape:
        eos = config.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            num_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            vocab_size=config.vocab_size,
            rms_norm_eps=float(config.rms_norm_eps),
            max_positions=config.max_position_embeddings,
            eos_token_ids=eos_ids,
        )


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # (d,)
    qkv: torch.Tensor  # ((H + 2 Hkv) * hd, d)
    o: torch.Tensor  # (d, H * hd)
    post_norm: torch.Tensor  # (d,)
    gate_up: torch.Tensor  # (2 ff, d)
    down: torch.Tensor  # (d, ff)

    @cached_property
    def packed(self) -> dict[str, PackedMatrix]:
        """The projections packed for the small-row CPU kernel (empty where it does not apply),
        made at the first projection that could use them."""
        packed = {name: pack(getattr(self, name)) for name in PROJECTIONS}
        return {name: matrix for name, matrix in packed.items() if matrix is not None}

    @cached_property
    def codes(self) -> dict[str, cpu_kernels.Q4Matrix]:
        """The projections that are exact 4-bit codes, as those codes (see `cpu_kernels.Q4Matrix`)."""
        codes = {name: cpu_kernels.q4_matrix(getattr(self, name)) for name in PROJECTIONS}
        return {name: matrix for name, matrix in codes.items() if matrix is not None}

    def kernel(self, shape: LlamaShape) -> cpu_kernels.LayerKernel | None:
        """The whole-layer CPU kernel over these weights (None where it does not apply), made once."""
        if "_kernel" not in self.__dict__:
            self.__dict__["_kernel"] = cpu_kernels.layer_kernel(
                self.packed, self.input_norm, self.post_norm, shape.num_heads, shape.num_kv_heads, shape.head_dim,
                shape.rms_norm_eps, self.codes if cpu_kernels.EXACT_4BIT else None,
            )
        return self.__dict__["_kernel"]

    def project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x @ W.T for projection `name` ("qkv", "o", "gate_up" or "down")."""
        matrix = self.packed.get(name)
        return matrix(x) if matrix is not None and matrix.accepts(x) else x @ getattr(self, name).T


@dataclass
class LlamaWeights:
    shape: LlamaShape
    embed: torch.Tensor  # (V, d)
    layers: list[LayerWeights]
    final_norm: torch.Tensor  # (d,)
    lm_head: torch.Tensor  # (V, d); the same tensor as `embed` when the checkpoint ties them
    inv_freq: torch.Tensor  # (hd / 2,) float32
    rope_scale: float  # the attention scaling some rotary types (yarn) put on cos/sin

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def matmul(self) -> str:
        """Which code multiplies by the weights ("small-row kernel" or "torch") and screens the head, for
        the page, the benchmark's JSON and the pass-cost tables."""
        if not self.layers[0].packed:
            return "torch"
        exact_4bit = cpu_kernels.EXACT_4BIT and self.layers[0].codes
        screen = self.screened_argmax.screen_way if self.screened_argmax else "float32"
        return f"small-row kernel{', exact 4-bit weights' if exact_4bit else ''}, {screen} head screen"

    @cached_property
    def packed_head(self) -> PackedMatrix | None:
        return pack(self.lm_head)

    @cached_property
    def screened_argmax(self) -> cpu_kernels.ExactArgmax | None:
        return cpu_kernels.exact_argmax(self.lm_head)

    def greedy(self, hidden: torch.Tensor) -> list[int]:
        """hidden (R, d) -> each row's greedy token: `logits(hidden).argmax(-1)`. On a CPU with the
        kernels, from a bfloat16 screen of the head (the same tokens; one row 1.5 ms with AMX, 2.0
        without, against 7.0 in float32 on a 2-core Xeon: the head is most of what a row reads)."""
        screened = self.screened_argmax
        if screened is not None and cpu_kernels.fits(hidden.contiguous()):
            return screened(hidden)[0]
        return self.logits(hidden).argmax(-1).tolist()

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., d) -> logits (..., V)."""
        if self.packed_head is not None and self.packed_head.accepts(hidden):
            return self.packed_head(hidden)
        return hidden @ self.head_rows

    @cached_property
    def head_rows(self) -> torch.Tensor:
        """The LM head as (d, V), for `hidden @ head_rows`. On a CPU a contiguous transposed copy,
        made once: nearly twice as fast for one row (5.3 vs 9.5 ms for SmolLM2's 49152 x 576 head
        on a 2-core AMD EPYC), because MKL then streams the weights in order."""
        return self.lm_head.T.contiguous() if self.device.type == "cpu" else self.lm_head.T

    def cast(self, dtype: torch.dtype) -> LlamaWeights:
        """A copy in another dtype (the rotary frequencies stay float32)."""
        layers = [LayerWeights(*(getattr(layer, f.name).to(dtype) for f in fields(LayerWeights))) for layer in self.layers]
        embed = self.embed.to(dtype)
        lm_head = embed if self.lm_head is self.embed else self.lm_head.to(dtype)
        return LlamaWeights(self.shape, embed, layers, self.final_norm.to(dtype), lm_head, self.inv_freq, self.rope_scale)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], config, device, dtype) -> LlamaWeights:
        shape = LlamaShape.from_config(config)

        def get(name: str) -> torch.Tensor:
            return state[name].to(device=device, dtype=dtype)

        layers = []
        for i in range(shape.num_layers):
            p = f"model.layers.{i}."
            attn = [get(p + f"self_attn.{n}_proj.weight") for n in ("q", "k", "v")]
            mlp = [get(p + f"mlp.{n}_proj.weight") for n in ("gate", "up")]
            layers.append(
                LayerWeights(
                    input_norm=get(p + "input_layernorm.weight"),
                    qkv=torch.cat(attn).contiguous(),
                    o=get(p + "self_attn.o_proj.weight"),
                    post_norm=get(p + "post_attention_layernorm.weight"),
                    gate_up=torch.cat(mlp).contiguous(),
                    down=get(p + "mlp.down_proj.weight"),
                )
            )
        embed = get("model.embed_tokens.weight")
        lm_head = embed if "lm_head.weight" not in state else get("lm_head.weight")
        inv_freq, rope_scale = rotary_frequencies(config)
        return cls(shape, embed, layers, get("model.norm.weight"), lm_head, inv_freq.to(device), rope_scale)


def rotary_frequencies(config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scale for the config's rotary type and scaling."""
    params = getattr(config, "rope_parameters", None) or {}
    legacy = getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    if rope_type in _DYNAMIC_ROPE_TYPES:
        raise ValueError(f"rotary scaling '{rope_type}' depends on sequence length and is not supported")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)).float(), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(scale)


# Up to this context, rotary_tables reads rows of cos and sin made once for every position (4 MB for
# SmolLM2's 8192): a pass's eight small ops to compute them cost ~0.2 ms on a 2-core Xeon.
ROTARY_TABLE_POSITIONS = 32768
# The table also covers this many positions past the context: a reply that ends at the context's last
# position still drafts nodes and streams beyond it (at most a node budget and a copied branch deep).
ROTARY_TABLE_SPARE = 512


def rotary_tables(weights: LlamaWeights, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (R, hd), for integer positions (R,)."""
    if weights.shape.max_positions > ROTARY_TABLE_POSITIONS:
        return _rotary(weights, positions)
    tables = weights.__dict__.get("_rotary_tables")
    if tables is None:
        every = torch.arange(weights.shape.max_positions + ROTARY_TABLE_SPARE, device=weights.inv_freq.device)
        tables = weights.__dict__["_rotary_tables"] = _rotary(weights, every)
    return tables[0][positions], tables[1][positions]


def _rotary(weights: LlamaWeights, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions.to(torch.float32)[:, None] * weights.inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * weights.rope_scale).to(weights.dtype)
    sin = (emb.sin() * weights.rope_scale).to(weights.dtype)
    return cos, sin


# On a GPU, RMS norm as torch's one fused kernel (aten::_fused_rms_norm) instead of six to eight ops:
# passes there are bound by kernel launches (about 2,000 a tree pass on an H200, 16 of a layer's ~40 in
# its two norms in bfloat16). Not for float64, whose op-by-op norm computes in float32 as on the CPU (the
# CUDA tests compare tokens with the CPU's). SPECSTREAM_FUSED_NORM=0 keeps the op-by-op norm (to time both).
FUSED_NORM_ON_GPU = os.environ.get("SPECSTREAM_FUSED_NORM", "1") != "0"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.shape[-1] % 8 == 0 and cpu_kernels.fits(x, weight):
        return cpu_kernels.rms_norm(x, weight, eps)
    if x.is_cuda and FUSED_NORM_ON_GPU and x.dtype != torch.float64:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Delta(Protocol):
    """Something that adds a (low-rank) correction to a projection, on some rows only."""

    def __call__(self, target: str, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor: ...


KVFunction = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _project(name: str, x: torch.Tensor, layer: LayerWeights, delta: Delta | None) -> torch.Tensor:
    out = layer.project(name, x)
    return out if delta is None else delta(name, x, out)


def decoder_layer(
    layer: LayerWeights,
    shape: LlamaShape,
    x: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor],
    kv: KVFunction,
    mask: torch.Tensor | None,
    delta: Delta | None = None,
) -> torch.Tensor:
    """One Llama layer over rows x (B, R, d).

    `kv(k, v)` receives this layer's new keys and values (B, Hkv, R, hd) and returns every key and
    value the rows may attend to (B, Hkv, S, hd); `mask` (R, S) is True where a row may attend (or
    the additive bias of `attention_bias`).
    """
    batch, rows, _ = x.shape
    heads, kv_heads, head_dim = shape.num_heads, shape.num_kv_heads, shape.head_dim
    h = rms_norm(x, layer.input_norm, shape.rms_norm_eps)
    qkv = _project("qkv", h, layer, delta)
    cos, sin = rotary
    rotated = head_dim % 16 == 0 and cos.dim() == 2 and cpu_kernels.fits(qkv, cos, sin)
    if rotated:  # queries and keys rotated in place, in one call
        cpu_kernels.rotary(qkv, heads + kv_heads, head_dim, cos, sin)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    if not rotated:  # queries and keys in one rotation: on a GPU each op is a kernel launch
        qk = qkv[..., : (heads + kv_heads) * head_dim].view(batch, rows, heads + kv_heads, head_dim)
        q, k = _rotate(qk, cos[:, None], sin[:, None]).split([heads, kv_heads], dim=2)
    q = q.reshape(batch, rows, heads, head_dim).transpose(1, 2)  # (B, H, R, hd)
    k = k.reshape(batch, rows, kv_heads, head_dim).transpose(1, 2)  # (B, Hkv, R, hd)
    v = v.view(batch, rows, kv_heads, head_dim).transpose(1, 2)
    keys, values = kv(k, v)
    attn = attend(q, keys, values, None if mask is None else mask[None, None])
    attn = attn.transpose(1, 2).reshape(batch, rows, heads * head_dim)
    x = x + _project("o", attn, layer, delta)
    h = rms_norm(x, layer.post_norm, shape.rms_norm_eps)
    gate, up = _project("gate_up", h, layer, delta).chunk(2, dim=-1)
    return x + _project("down", F.silu(gate) * up, layer, delta)


def decoder_layers(weights: LlamaWeights, layers: range, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor],
                   cache: KVCache, slots: torch.Tensor | int, span: int, mask: torch.Tensor | None,
                   deltas: list[Delta | None] | None = None) -> torch.Tensor:
    """Consecutive layers of one pass over rows x (1, R, d), each writing its keys and values into
    `cache` at `slots` and attending below `span`; deltas[i] for layers[i]. In one C call where every
    layer takes the whole-layer kernel, else layer by layer."""
    deltas = deltas or [None] * len(layers)
    stack = _layer_stack(weights, layers, x, rotary, cache, span, mask, deltas)
    if stack is not None:
        first_row = next((delta.first_row for delta in deltas if delta is not None), 0)
        keys, values = cache.keys[layers.start :], cache.values[layers.start :]
        return stack(x[0], *rotary, keys, values, slots, span, mask, first_row)[None]
    for layer, delta in zip(layers, deltas):
        x = decoder_layer(weights.layers[layer], weights.shape, x, rotary, cache.slots(layer, slots, span), mask, delta)
    return x


def _layer_stack(weights: LlamaWeights, layers: range, x: torch.Tensor, rotary, cache: KVCache, span: int,
                 mask: torch.Tensor | None, deltas: list) -> cpu_kernels.LayerStack | None:
    """The layers as one `LayerStack` (made once per run of layers and pairs), or None where they run op
    by op: a batch, another device, a delta without packed pairs, or rows, cache or bias the kernel does
    not take."""
    if x.shape[0] != 1 or x.device.type != "cpu" or not layers:
        return None
    loras = [None if delta is None else getattr(delta, "kernel", None) for delta in deltas]
    if any(lora is None for lora, delta in zip(loras, deltas) if delta is not None):
        return None
    if len({delta.first_row for delta in deltas if delta is not None}) > 1:
        return None
    kernels = [weights.layers[layer].kernel(weights.shape) for layer in layers]
    if None in kernels or not kernels[0].fits(x[0], rotary[0], cache.keys[layers.start, 0], mask, span):
        return None
    # Keyed by the objects' ids, which stay unique while the stack (holding them) is cached; the oldest
    # go first, so adapters swapped in and out of a running app do not stay alive through it.
    key = (layers.start, layers.stop, *(id(lora) for lora in loras))
    stacks = weights.__dict__.setdefault("_stacks", {})
    if key not in stacks:
        if len(stacks) >= MAX_LAYER_STACKS:
            stacks.pop(next(iter(stacks)))
        stacks[key] = cpu_kernels.LayerStack(kernels, loras)
    return stacks[key]


MAX_LAYER_STACKS = 8  # per base model: the layers below the streams and the stream layers per adapter


# On a GPU, attention without cuDNN's kernel, which torch 2.11 picks on an H200 and which sets itself
# up anew for each new shape: decoding brings a new key length with every pass (one call with a new
# length 66 ms, with a repeated one 1.9 ms; flash attention 0.06 ms). Plain decoding went from 65 to 19
# ms a token there. SPECSTREAM_SDPA=torch restores torch's own choice.
GPU_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def attention_backends(device: torch.device):
    """The context a pass's attention runs in: on a GPU, the backends of GPU_ATTENTION only."""
    if device.type != "cuda" or os.environ.get("SPECSTREAM_SDPA") == "torch":
        return nullcontext()
    return sdpa_kernel(GPU_ATTENTION)


def with_attention_backends(method):
    """Runs a model method (of an object with `weights`) inside `attention_backends`."""

    @wraps(method)
    def wrapper(self, *args, **kwargs):
        with attention_backends(self.weights.device):
            return method(self, *args, **kwargs)

    return wrapper


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Grouped-query attention of q (B, H, R, hd) over keys and values (B, Hkv, S, hd).

    On an H200 (torch 2.11) a masked call with `enable_gqa` found no kernel but the math one: 0.53 ms
    for 12 tree rows against 0.06 for one unmasked row, 16 ms of a 27.5 ms tree pass over 30 layers.
    Repeating the key and value heads instead lets such calls reach the memory-efficient kernel, so on
    a GPU the first masked call times both ways and keeps the faster (`expand_groups`)."""
    expand = mask is not None and q.is_cuda and expand_groups(q, keys, values, mask)
    return (_expanded_attention if expand else _grouped_attention)(q, keys, values, mask)


def _expanded_attention(q, keys, values, mask):
    groups = q.shape[1] // keys.shape[1]
    keys, values = keys.repeat_interleave(groups, dim=1), values.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def _grouped_attention(q, keys, values, mask):
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)


_GROUPS_CHOICE: dict = {}  # (device, dtype) -> whether masked attention repeats key and value heads


def expand_groups(q, keys, values, mask, timer=None) -> bool:
    """Whether masked attention on q's device repeats the key and value heads: SPECSTREAM_GQA=expand
    or native decides; else the faster of the two on these very tensors, timed once per device and dtype
    (each way warmed up once, then the least of three calls each)."""
    forced = _forced_gqa()
    if forced:
        return forced == "expand"
    key = (q.device, q.dtype)
    if key not in _GROUPS_CHOICE:
        timer = timer or _device_timer(q.device)
        ways = (_grouped_attention, _expanded_attention)
        for way in ways:
            way(q, keys, values, mask)
        best = [min(timer(lambda: way(q, keys, values, mask)) for _ in range(3)) for way in ways]
        _GROUPS_CHOICE[key] = best[1] < best[0]
    return _GROUPS_CHOICE[key]


def masked_attention_way(device: torch.device) -> str:
    """How masked attention ran on `device` ("expand", "native", or "untimed" before the first masked call)."""
    forced = _forced_gqa()
    if forced:
        return forced
    chosen = [expand for (seen, _), expand in _GROUPS_CHOICE.items()
              if seen.type == device.type and device.index in (None, seen.index)]
    return "untimed" if not chosen else "expand" if chosen[-1] else "native"


def _forced_gqa() -> str | None:
    """"expand" or "native" where SPECSTREAM_GQA fixes the way, else None (timed)."""
    setting = os.environ.get("SPECSTREAM_GQA", "auto")
    return setting if setting in ("expand", "native") else None


def _device_timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def seconds(call) -> float:
        torch.cuda.synchronize(device)
        started = time.perf_counter()
        call()
        torch.cuda.synchronize(device)
        return time.perf_counter() - started

    return seconds


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean attention mask (R, S) as the additive bias attention takes (0 where a row may attend,
    -inf elsewhere). Made once per pass: given the boolean mask, attention converts it in every layer
    (about 1 ms a pass over 8 tree nodes on the 2-core AMD EPYC; the same bits either way)."""
    key = (dtype, mask.device)
    if key not in _BIAS_VALUES:
        _BIAS_VALUES[key] = (torch.zeros((), dtype=dtype, device=mask.device),
                             torch.full((), float("-inf"), dtype=dtype, device=mask.device))
    return torch.where(mask, *_BIAS_VALUES[key])


_BIAS_VALUES: dict = {}  # (dtype, device) -> the bias's 0 and -inf as scalar tensors, made once


def causal_block_mask(past: int, rows: int, device) -> torch.Tensor:
    """(rows, past + rows): every row sees the cached prefix and the rows up to itself."""
    block = torch.ones(rows, rows, dtype=torch.bool, device=device).tril()
    return torch.cat([torch.ones(rows, past, dtype=torch.bool, device=device), block], dim=1)
