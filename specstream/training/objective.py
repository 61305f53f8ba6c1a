"""The future n-gram objective: stream j at position t learns token t+1+j, and the pruning map
learns the next token from the early-exit layer.

In lossless mode only the stream terms and the pruning term exist (the main stream is frozen,
its own loss a constant). In shared mode the adapter's low-rank corrections also apply to the
main stream of the top layers, and the main next-token loss joins with weight `main_weight`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..adapter import StreamAdapter
from ..draft_vocab import column_lookup
from ..llama import LlamaWeights, causal_block_mask, decoder_layer, rms_norm, rotary_tables
from ..streams import LoraDelta, stream_attention_mask
from .features import Features


def default_stream_weights(gamma: int) -> tuple[float, ...]:
    """A deeper draft token only counts if every shallower one was accepted, so earlier streams
    weigh more (the paper's a_j = 0.1 is for its shared setting, where the main loss dominates)."""
    return tuple(0.8**j for j in range(gamma))


class StreamObjective(nn.Module):
    """Holds the trainable adapter; the frozen base weights are kept outside the module so that
    data-parallel wrappers neither broadcast nor synchronise them."""

    def __init__(self, adapter: StreamAdapter, weights: LlamaWeights, stream_weights=None, main_weight=1.0, prune_weight=0.5):
        super().__init__()
        self.adapter = adapter
        self.__dict__["base"] = weights  # not a submodule or parameter
        self.stream_weights = stream_weights or default_stream_weights(adapter.config.gamma)
        self.main_weight, self.prune_weight = main_weight, prune_weight
        self.first_layer = weights.shape.num_layers - adapter.config.stream_layers
        ids = None if adapter.draft_ids is None else adapter.draft_ids.to(weights.device)
        self.__dict__["draft_head"] = weights.lm_head if ids is None else weights.lm_head[ids]
        self.__dict__["draft_columns"] = None if ids is None else column_lookup(ids, weights.shape.vocab_size)

    def forward(self, features: Features) -> tuple[torch.Tensor, dict[str, float]]:
        hidden, early, start = self.top_layers(features)
        base, gamma = self.base, self.adapter.config.gamma
        tokens = features.tokens.to(base.device)
        batch, length = tokens.shape
        sources = length - start
        stream_hidden = hidden[:, -sources * gamma :].view(batch, sources, gamma, -1)
        loss, metrics = self._stream_loss(stream_hidden, tokens, features, start)
        prune_loss = self._pruning_loss(early, tokens, features)
        loss = loss + self.prune_weight * prune_loss
        metrics["pruning_loss"] = float(prune_loss.detach())
        if not self.adapter.config.lossless:
            main_loss = self._next_token_loss(hidden[:, :length], tokens, features)
            loss = loss + self.main_weight * main_loss
            metrics["main_loss"] = float(main_loss.detach())
        metrics["loss"] = float(loss.detach())
        return loss, metrics

    def top_layers(self, features: Features) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The top layers over a batch: their final-normed rows (B, S * gamma, d), the streams of
        positions start.. L - 1, source-major, after the L main rows in shared mode; the main stream
        entering them; and start."""
        base, gamma = self.base, self.adapter.config.gamma
        device = base.device
        tokens = features.tokens.to(device)
        batch, length = tokens.shape
        start = int(features.first_source.min())  # no stream rows before any sequence's reply
        sources = length - start
        early = features.early_hidden.to(device=device, dtype=base.dtype)
        streams = early[:, start:, None, :] + self.adapter.stream_identity(gamma)[None, None]  # (B, S, g, d)
        if self.adapter.config.bonus_rank:  # each source's bonus token is the sequence's next token
            following = torch.cat([tokens[:, start + 1 :], tokens.new_zeros(batch, 1)], dim=1)
            streams = streams + self.adapter.bonus_shift(base.embed[following].to(streams.dtype))[:, :, None, :]
        streams = streams.reshape(batch, sources * gamma, -1)
        stream_positions = (torch.arange(start, length, device=device)[:, None] + torch.arange(1, gamma + 1, device=device)).reshape(-1)
        causal = causal_block_mask(0, length, device)
        mask = stream_attention_mask(causal, list(range(start, length)), gamma)  # (L + S g, L + S g)
        if self.adapter.config.lossless:
            x, positions, mask = streams, stream_positions, mask[length:]
        else:
            x = torch.cat([early, streams], dim=1)
            positions = torch.cat([torch.arange(length, device=device), stream_positions])
        rotary = rotary_tables(base, positions)
        for offset in range(self.adapter.config.stream_layers):
            layer = self.first_layer + offset
            x = decoder_layer(base.layers[layer], base.shape, x, rotary, self._kv(features, offset), mask, LoraDelta(self.adapter, offset, 0))
        return rms_norm(x, base.final_norm, base.shape.rms_norm_eps), early, start

    def _kv(self, features: Features, offset: int):
        if features.main_keys is None:
            return lambda k, v: (k, v)
        keys, values = features.main_keys[offset], features.main_values[offset]

        def with_main(k, v):
            return torch.cat([keys.to(k.device, k.dtype), k], dim=2), torch.cat([values.to(v.device, v.dtype), v], dim=2)

        return with_main

    def _stream_loss(self, stream_hidden, tokens, features: Features, start: int):
        """Stream j (1-based) at position t predicts tokens[t + 1 + j]."""
        batch, sources, gamma, _ = stream_hidden.shape
        device = tokens.device
        t = torch.arange(start, start + sources, device=device)[None, :, None]
        j = torch.arange(1, gamma + 1, device=device)[None, None, :]
        target_index = t + 1 + j  # (1, S, g)
        valid = (t >= features.first_source.to(device)[:, None, None]) & (target_index < features.lengths.to(device)[:, None, None])
        b, s, jj = valid.nonzero(as_tuple=True)
        targets = tokens[b, target_index[0, s, jj]]
        # Over the draft vocabulary only (what the streams may propose at inference): a target
        # outside it cannot be drafted, so it adds no loss and counts as a miss in top-1.
        columns = targets if self.draft_columns is None else self.draft_columns[targets]
        inside = columns >= 0
        logits = stream_hidden[b, s, jj] @ self.draft_head.T
        losses = F.cross_entropy(logits.float(), columns.clamp(min=0), reduction="none")
        correct = ((logits.argmax(-1) == columns) & inside).float()
        total, metrics = 0.0, {}
        for stream in range(gamma):
            chosen = jj == stream
            if (chosen & inside).any():
                stream_loss = losses[chosen & inside].mean()
                total = total + self.stream_weights[stream] * stream_loss
                metrics[f"stream{stream + 1}_loss"] = float(stream_loss.detach())
                metrics[f"stream{stream + 1}_top1"] = float(correct[chosen].mean())
        return total, metrics

    def _pruning_loss(self, early, tokens, features: Features) -> torch.Tensor:
        hidden = self.adapter.pruning_map(early)
        hidden = rms_norm(hidden, self.base.final_norm, self.base.shape.rms_norm_eps)
        # Every 4th position: the map has a few thousand weights, and the LM head over every
        # position would cost as much as a whole stream.
        return self._next_token_loss(hidden, tokens, features, every=4)

    def _next_token_loss(self, hidden, tokens, features: Features, every: int = 1) -> torch.Tensor:
        """Cross-entropy of hidden (B, L, d) at reply positions against the next token."""
        device = tokens.device
        t = torch.arange(tokens.shape[1], device=device)[None, :]
        valid = (t >= features.first_source.to(device)[:, None]) & (t + 1 < features.lengths.to(device)[:, None])
        valid &= t % every == 0
        b, s = valid.nonzero(as_tuple=True)
        logits = hidden[b, s] @ self.base.lm_head.T
        return F.cross_entropy(logits.float(), tokens[b, s + 1])
