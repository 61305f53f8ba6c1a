"""The draft vocabulary: the tokens the streams may propose.

A small chat model writes few of its vocabulary's tokens (SmolLM2-135M's replies to 1024 prompts
use about 7k of 49k), yet a stream's logits over the full vocabulary cost as much as the main
stream's. Restricting the streams' LM head to the tokens the model actually writes (as FR-Spec,
Zhao et al. 2025, does for drafters) cuts that cost by the vocabulary ratio, in training and at
inference. Outputs cannot change: a token outside the draft vocabulary is never proposed, and
verification always reads the full head.
"""

from __future__ import annotations

from collections import Counter
from itertools import islice
from typing import Iterable

import torch


def frequency_ranked(token_lists: Iterable[Iterable[int]], size: int, vocab_size: int) -> torch.Tensor:
    """The `size` most frequent tokens of `token_lists`, topped up with the lowest ids unseen (a
    BPE vocabulary numbers its tokens roughly in merge order, so low ids are the common ones).
    Sorted ids, (size,) long."""
    if not 1 <= size <= vocab_size:
        raise ValueError(f"the draft vocabulary must have 1 to {vocab_size} tokens, not {size}")
    counts = Counter(token for tokens in token_lists for token in tokens if 0 <= token < vocab_size)
    chosen = [token for token, _ in counts.most_common(size)]
    seen = set(chosen)
    chosen += islice((token for token in range(vocab_size) if token not in seen), size - len(chosen))
    return torch.tensor(sorted(chosen), dtype=torch.long)


def column_lookup(draft_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(vocab_size,) long: each token's column in the draft vocabulary, -1 outside it."""
    lookup = torch.full((vocab_size,), -1, dtype=torch.long, device=draft_ids.device)
    lookup[draft_ids] = torch.arange(len(draft_ids), device=draft_ids.device)
    return lookup
