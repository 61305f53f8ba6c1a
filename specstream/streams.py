"""The Speculative Streaming model: a base Llama plus speculative streams in its top layers.

Rows of one forward pass, in order: the main-stream nodes (a prompt, a single token or a flattened
draft tree), then `gamma` stream rows for each node that sources streams. Layers below
`N - N_s` see main rows only; at that layer an optional row selector prunes the tree, and each
stream enters as its node's hidden state plus the stream's identifier embedding. In the top
layers main rows attend to main rows exactly as in the base model; stream j of node t attends to
the main stream up to and including t and to streams 1..j of t (multi-stream attention).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .adapter import StreamAdapter
from .kv_cache import KVCache
from .llama import LlamaWeights, attention_bias, decoder_layers, rms_norm, rotary_tables, with_attention_backends
from .phrases import PhraseTable
from . import cpu_kernels
from .cpu_kernels import PackedMatrix, pack

RowSelector = Callable[[torch.Tensor], list[int] | None]


PackedLora = dict[str, tuple[PackedMatrix, PackedMatrix]]


def pack_lora(adapter: StreamAdapter) -> PackedLora:
    """A frozen adapter's low-rank pairs packed for the small-row CPU kernel, the scale folded into
    `up` (empty where the kernel does not apply). Halves their cost: 48 stream rows through the
    3072-wide gate/up pair, 467 -> 244 us on the 2-core AMD EPYC. A lossless adapter's pairs only
    ever correct stream rows, whose outputs are drafts, so they are packed in bfloat16: the rank-64
    pairs of six layers are 13 MB in float32, read once or twice a pass."""
    pairs, narrow = {}, adapter.config.lossless
    for key, down in adapter.lora_down.items():
        packed_down, packed_up = pack(down, narrow), pack(adapter.lora_up[key] * adapter.lora_scale, narrow)
        if packed_down is not None and packed_up is not None:
            pairs[key] = (packed_down, packed_up)
    return pairs


def lora_kernels(adapter: StreamAdapter | None, packed: PackedLora, layers: int) -> dict[int, cpu_kernels.LoraKernel]:
    """Each stream layer's packed pairs for the whole-layer CPU kernel, where every pair of it is packed."""
    kernels = {}
    for layer in range(layers if adapter else 0):
        keys = {key for key in adapter.lora_down if key.startswith(f"{layer}_")}
        pairs = {key.split("_", 1)[1]: packed[key] for key in keys if key in packed}
        if len(pairs) == len(keys) and set(pairs) <= set(cpu_kernels.PROJECTIONS):
            kernels[layer] = cpu_kernels.LoraKernel(pairs)
    return kernels


class LoraDelta:
    """Adds one top layer's low-rank corrections to rows `first_row:` of each projection."""

    def __init__(self, adapter: StreamAdapter, layer: int, first_row: int, packed: PackedLora | None = None,
                 kernel: cpu_kernels.LoraKernel | None = None):
        self.adapter, self.layer, self.first_row, self.packed = adapter, layer, first_row, packed or {}
        self.kernel = kernel  # the same pairs for the whole-layer CPU kernel, where they all are packed

    def __call__(self, target: str, inputs: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        key = f"{self.layer}_{target}"
        if key not in self.adapter.lora_down or self.first_row >= outputs.shape[1]:
            return outputs
        rows = inputs[:, self.first_row :]
        if key in self.packed and inputs.shape[0] == 1 and cpu_kernels.fits(inputs, outputs):
            down, up = self.packed[key]
            cpu_kernels.lora_add(rows[0], down, up, outputs[0, self.first_row :])
            return outputs
        if key in self.packed and self.packed[key][0].accepts(rows):
            down, up = self.packed[key]
            correction = up(down(rows))
        else:
            correction = (rows @ self.adapter.lora_down[key].T) @ self.adapter.lora_up[key].T
            correction = correction * self.adapter.lora_scale
        if self.first_row == 0:
            return outputs + correction
        outputs[:, self.first_row :] += correction
        return outputs


def stream_attention_mask(main_mask: torch.Tensor, sources: list[int], gamma: int) -> torch.Tensor:
    """The multi-stream attention mask for the top layers.

    main_mask (K, S): which of the S cached-plus-block slots each main row sees.
    Returns (K + len(sources) * gamma, S + len(sources) * gamma), stream rows and columns ordered
    (source, stream). Main rows never see a stream; stream j of source t sees what t sees, plus
    streams 1..j of t.
    """
    rows, slots = main_mask.shape
    count = len(sources) * gamma
    if not count:  # no stream rows (a deferred pass): block_diag of nothing is not an empty block
        return main_mask
    own_streams = torch.block_diag(*[torch.ones(gamma, gamma, dtype=torch.bool).tril()] * len(sources))
    top = torch.cat([main_mask, main_mask.new_zeros(rows, count)], dim=1)
    inherited = main_mask[sources].repeat_interleave(gamma, dim=0)
    bottom = torch.cat([inherited, own_streams.to(main_mask.device)], dim=1)
    return torch.cat([top, bottom], dim=0)


@dataclass
class PassOutput:
    kept: list[int]  # indices of the input rows that reached the top layers
    main_hidden: torch.Tensor  # (K, d), final-normed, for kept rows
    stream_hidden: torch.Tensor | None  # (sources, gamma, d), final-normed
    early_hidden: torch.Tensor  # (T, d), main stream at the first stream layer, before pruning
    stream_nodes: list[int] = field(default_factory=list)  # the input row of each stream source

    def streams_of(self, node: int) -> torch.Tensor | None:
        """(gamma, d): the streams this pass computed at input row `node`; None if it computed none there."""
        return self.stream_hidden[self.stream_nodes.index(node)] if node in self.stream_nodes else None


class SpeculativeModel:
    """Base weights (frozen) and an optional stream adapter, on one device and dtype."""

    def __init__(self, weights: LlamaWeights, adapter: StreamAdapter | None, phrases: PhraseTable | None = None):
        self.weights = weights
        self.phrases = phrases  # a draft source beside the streams; see phrases.py
        self.shape = weights.shape
        if adapter is not None:
            adapter = adapter.to(device=weights.device, dtype=weights.dtype).eval().requires_grad_(False)
        self.adapter = adapter
        self._packed_lora = pack_lora(adapter) if adapter else {}
        self.gamma = adapter.config.gamma if adapter else 0
        stream_layers = adapter.config.stream_layers if adapter else 0
        self._lora_kernels = lora_kernels(adapter, self._packed_lora, stream_layers)
        self.first_stream_layer = self.shape.num_layers - stream_layers
        self.draft_ids = adapter.draft_ids if adapter else None
        self._draft_rows = None if self.draft_ids is None else weights.lm_head[self.draft_ids].contiguous()  # (V', d)
        # Narrow rows (int8 with AMX, else bfloat16): the draft logits only rank drafts, outputs never
        # depend on them, and the head is read every pass. Interleaved A/B with the float32 adapter pairs
        # (16 Spec-Bench prompts, 2-core Xeon): 51.96 -> 53.11 tokens/s, tau 1.918 -> 1.905.
        self._packed_draft_rows = None if self._draft_rows is None else cpu_kernels.pack_draft_head(self._draft_rows)

    def new_cache(self, capacity: int) -> KVCache:
        s = self.shape
        return KVCache(s.num_layers, s.num_kv_heads, s.head_dim, capacity, device=self.weights.device, dtype=self.weights.dtype)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.weights.logits(hidden)

    def greedy(self, hidden: torch.Tensor) -> list[int]:
        """hidden (R, d) -> the main stream's greedy token at each row."""
        return self.weights.greedy(hidden)

    def _draft_logits(self, stream_hidden: torch.Tensor) -> torch.Tensor:
        if self._draft_rows is None:
            return self.weights.logits(stream_hidden)
        if self._packed_draft_rows is not None and self._packed_draft_rows.accepts(stream_hidden):
            return self._packed_draft_rows(stream_hidden)
        return stream_hidden @ self._draft_rows.T

    @property
    def verifies_row_by_row(self) -> bool:
        """Whether verification runs the LM head over one row per accepted token rather than over
        every tree row at once: on a CPU without the small-row kernel, where MKL's head over 16 rows
        cost 25 ms against 5 ms for one (SmolLM2-135M, 2-core AMD EPYC). With the kernel (16 rows
        in 13 ms, one in 4.8) or on a GPU, all rows at once cost less than the accepted path's rows."""
        return self.weights.device.type == "cpu" and self.weights.packed_head is None

    def draft_topk(self, stream_hidden: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(probabilities, token ids), each (rows, k): the k likeliest drafts of each stream row,
        over the adapter's draft vocabulary (probabilities normalised within it)."""
        logits = self._draft_logits(stream_hidden)
        if logits.dim() == 2 and k <= min(logits.shape[1], 64) and cpu_kernels.fits(logits):
            top_probs, columns = cpu_kernels.top_probabilities(logits, k)
        else:
            top_probs, columns = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)
        return top_probs, columns if self.draft_ids is None else self.draft_ids[columns]

    @with_attention_backends
    def forward(
        self,
        cache: KVCache,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        block_mask: torch.Tensor,
        *,
        stream_sources: str | list[int] | None = None,
        select_rows: RowSelector | None = None,
        gamma: int | None = None,
    ) -> PassOutput:
        """One pass over T new main-stream rows (T,) at `positions`, seeing the committed cache and
        the block rows that `block_mask` (T, T) allows. `stream_sources` is None, "all", "last" or a
        list of input rows (a pruned row among them gets no streams);
        `select_rows` may prune rows at the first stream layer; `gamma` may use only the first
        streams, which is exact because stream j never sees streams after it. Writes the main rows' keys and
        values past `cache.length` (at their original offsets) without committing them."""
        w, past, count = self.weights, cache.length, tokens.shape[0]
        mask = torch.cat([block_mask.new_ones(count, past), block_mask], dim=1)
        x = w.embed[tokens][None]  # (1, T, d)
        rotary = rotary_tables(w, positions)
        low_mask = None if count == 1 else attention_bias(mask, w.dtype)
        x = decoder_layers(w, range(self.first_stream_layer), x, rotary, cache, past, past + count, low_mask)
        early_hidden = x[0]
        kept = select_rows(early_hidden) if select_rows else None
        kept = list(range(count)) if kept is None else kept
        if len(kept) < count:
            x, positions, mask = x[:, kept], positions[kept], mask[kept]
        sources = self._stream_sources(stream_sources, kept)
        gamma = self.gamma if gamma is None else min(gamma, self.gamma)
        x, rotary, mask, slots = self._add_streams(x, positions, mask, sources, gamma, kept, past, rotary)
        first_adapted = len(kept) if (self.adapter and self.adapter.config.lossless) else 0
        span = mask.shape[1]
        # A single new row sees every slot: no mask is faster.
        mask = None if not sources and count == 1 else attention_bias(mask, w.dtype)
        x = decoder_layers(w, self._stream_layers, x, rotary, cache, slots, span, mask, self._deltas(first_adapted))
        hidden = rms_norm(x[0], w.final_norm, self.shape.rms_norm_eps)
        streams = hidden[len(kept) :].view(len(sources), gamma, -1) if sources else None
        return PassOutput(kept, hidden[: len(kept)], streams, early_hidden, [kept[row] for row in sources])

    @property
    def _stream_layers(self) -> range:
        return range(self.first_stream_layer, self.shape.num_layers)

    def _deltas(self, first_row: int) -> list[LoraDelta | None]:
        """The adapter's low-rank corrections at each stream layer, from row `first_row` on."""
        if self.adapter is None:
            return [None] * len(self._stream_layers)
        return [LoraDelta(self.adapter, index, first_row, self._packed_lora, self._lora_kernels.get(index))
                for index in range(len(self._stream_layers))]

    def _stream_sources(self, which: str | list[int] | None, kept: list[int]) -> list[int]:
        """The kept rows (positions in `kept`) that carry streams."""
        if which is None or self.adapter is None:
            return []
        if self.streams_need_bonus:  # rows made here could not see it: they would be silently wrong
            raise ValueError("this adapter's streams read the bonus token: compute them with streams_at_end")
        if which == "all":
            return list(range(len(kept)))
        if which == "last":
            return [len(kept) - 1]
        wanted = set(which)
        return [row for row, node in enumerate(kept) if node in wanted]

    def _add_streams(self, x, positions, mask, sources, gamma, kept, past, rotary):
        """Append stream rows (source-major) and build the top layers' rotary, mask and slots
        (`rotary`: the main rows' before pruning)."""
        device, block = x.device, mask.shape[1] - past
        pruned = len(kept) < block
        # Unpruned rows and the stream scratch rows after them are contiguous: a slice write is cheaper.
        slots = torch.tensor(kept, device=device) + past if pruned else past
        if not sources:
            return x, rotary if not pruned else rotary_tables(self.weights, positions), mask, slots
        embeddings = self.adapter.stream_identity(gamma)  # (gamma, d)
        streams = (x[0, sources][:, None, :] + embeddings[None]).reshape(1, -1, x.shape[-1])
        offsets = torch.arange(1, gamma + 1, device=device)
        # Stream j of the node at position p sits at p + j: the position of the token it predicts, less one.
        stream_positions = (positions[sources][:, None] + offsets[None]).reshape(-1)
        rotary = rotary_tables(self.weights, torch.cat([positions, stream_positions]))
        mask = stream_attention_mask(mask, sources, gamma)
        if pruned:
            scratch = torch.arange(len(sources) * gamma, device=device) + past + block
            slots = torch.cat([slots, scratch])
        return torch.cat([x, streams], dim=1), rotary, mask, slots

    @property
    def streams_need_bonus(self) -> bool:
        """Whether the adapter's streams also read the token verification chose after their node
        (AdapterConfig.bonus_rank), so that they can only be computed after verification."""
        return bool(self.adapter is not None and self.adapter.config.bonus_rank)

    @with_attention_backends
    def streams_at_end(self, cache: KVCache, early_row: torch.Tensor, gamma: int, bonus: int | None = None) -> torch.Tensor:
        """Streams of the last committed position alone, after the pass that committed it.

        Streams never change the main stream, so computing them in a short second pass (gamma
        rows through the top layers, seeing the committed cache) gives what the joint pass would
        have given at that node. On a CPU this is far cheaper than carrying gamma stream rows
        for every tree node. early_row (d,) is that node's main stream entering the first
        stream layer; `bonus` the token chosen after it, which an adapter with a bonus map reads.
        Returns (gamma, d), final-normed."""
        w, length = self.weights, cache.length
        x = (early_row[None] + self.adapter.stream_identity(gamma))[None]  # (1, gamma, d)
        if self.streams_need_bonus:
            if bonus is None:
                raise ValueError("this adapter's streams read the bonus token: pass it")
            x = x + self.adapter.bonus_shift(w.embed[bonus])
        offsets = torch.arange(1, gamma + 1, device=x.device)
        rotary = rotary_tables(w, offsets + (length - 1))
        visible = torch.ones(1, length, dtype=torch.bool, device=x.device)
        mask = attention_bias(stream_attention_mask(visible, [0], gamma)[1:], w.dtype)  # (gamma, length + gamma)
        x = decoder_layers(w, self._stream_layers, x, rotary, cache, length, length + gamma, mask, self._deltas(0))
        return rms_norm(x[0], w.final_norm, self.shape.rms_norm_eps)

    def transition_scores(self, early_hidden: torch.Tensor, tokens: list[int], parents: list[int]) -> list[float]:
        """The pruning map's estimate of each node's probability given its parent (root: 1)."""
        internal = sorted({p for p in parents if p >= 0})
        if not internal or self.adapter is None:
            return [1.0] * len(tokens)
        row_of = {node: row for row, node in enumerate(internal)}
        hidden = self.adapter.pruning_map(early_hidden[internal])
        log_probs = torch.log_softmax(self.logits(rms_norm(hidden, self.weights.final_norm, self.shape.rms_norm_eps)).float(), dim=-1)
        rows = torch.tensor([row_of[p] for p in parents[1:]], device=log_probs.device)
        columns = torch.tensor(tokens[1:], device=log_probs.device)
        return [1.0] + log_probs[rows, columns].exp().tolist()
