"""Training sequences and the main-stream features that stay fixed while the streams train.

In lossless mode the base is frozen and the main stream never attends to a stream, so for each
training sequence the main stream's hidden states at the first stream layer, and its keys and
values in the top layers, never change. We compute them once and reuse them every epoch, so
training touches only the top layers' stream rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..llama import LlamaWeights, causal_block_mask, decoder_layer, rotary_tables
from ..selfdistill import Sample


@dataclass(frozen=True)
class Sequence:
    tokens: tuple[int, ...]
    first_source: int  # the last prompt position: streams are trained from here on


@dataclass
class Features:
    """One padded batch of sequences and their fixed main-stream features."""

    tokens: torch.Tensor  # (B, L) long, padded
    lengths: torch.Tensor  # (B,)
    first_source: torch.Tensor  # (B,)
    early_hidden: torch.Tensor  # (B, L, d) main stream entering the first stream layer
    main_keys: list[torch.Tensor] | None  # per top layer (B, Hkv, L, hd); None in shared mode
    main_values: list[torch.Tensor] | None


def to_sequences(samples: list[Sample], max_length: int) -> list[Sequence]:
    """Prompt plus reply, cut to max_length; a long prompt loses its beginning, not the reply."""
    sequences = []
    for sample in samples:
        reply = list(sample.reply_ids)[: max_length - 8]
        prompt = list(sample.prompt_ids)[-(max_length - len(reply)) :]
        if len(reply) >= 2 and prompt:
            sequences.append(Sequence(tuple(prompt + reply), len(prompt) - 1))
    return sequences


def pad(sequences: list[Sequence], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    longest = max(len(s.tokens) for s in sequences)
    tokens = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        tokens[i, : len(s.tokens)] = torch.tensor(s.tokens)
    lengths = torch.tensor([len(s.tokens) for s in sequences])
    return tokens, lengths, torch.tensor([s.first_source for s in sequences])


@torch.no_grad()
def main_stream_features(
    weights: LlamaWeights, sequences: list[Sequence], first_stream_layer: int, keep_top_kv: bool, store_dtype
) -> Features:
    """Run the frozen main stream over a batch (right-padded, so padding never reaches a real
    token through the causal mask), computed in the weights' dtype and stored in `store_dtype`."""
    tokens, lengths, first_source = pad(sequences, pad_id=0)
    device = weights.device
    x = weights.embed[tokens.to(device)]  # (B, L, d)
    length = tokens.shape[1]
    rotary = rotary_tables(weights, torch.arange(length, device=device))
    mask = causal_block_mask(0, length, device)
    keys, values = [], []

    def capture(k, v):
        keys.append(k.to(store_dtype))
        values.append(v.to(store_dtype))
        return k, v

    early = None
    last_layer = weights.shape.num_layers if keep_top_kv else first_stream_layer
    for layer in range(last_layer):
        if layer == first_stream_layer:
            early = x.to(store_dtype)
        kv = capture if layer >= first_stream_layer else (lambda k, v: (k, v))
        x = decoder_layer(weights.layers[layer], weights.shape, x, rotary, kv, mask)
    if early is None:
        early = x.to(store_dtype)
    return Features(
        tokens, lengths, first_source, early, keys if keep_top_kv else None, values if keep_top_kv else None
    )
