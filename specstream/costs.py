"""What one forward pass costs on the running device, by tree size.

On a GPU a pass over 8 to 64 nodes costs about what one token costs; on a small CPU it does not,
so the tree worth drafting depends on the machine. These timings feed the ablation in the model
card and the choice of tree.
"""

from __future__ import annotations

import statistics
import time

import torch

from .streams import SpeculativeModel
from .tree import tree_attention_mask


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bushy_parents(size: int, branching: int = 3) -> list[int]:
    """A tree of `size` nodes filled breadth-first, `branching` children per node."""
    return [-1] + [(i - 1) // branching for i in range(1, size)]


@torch.inference_mode()
def pass_seconds(model: SpeculativeModel, sizes: list[int], prompt_length: int = 200, repeats: int = 7) -> dict[int, float]:
    """Median wall time of one decoding pass (tree forward, verification logits over the tree,
    stream logits at one node) per tree size; size 1 without streams is a plain decoding step."""
    device = model.weights.device
    vocab = model.shape.vocab_size
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (prompt_length,), generator=generator).to(device)
    cache = model.new_cache(prompt_length + max(sizes) * (1 + model.gamma) + 1)
    causal = torch.ones(prompt_length, prompt_length, dtype=torch.bool, device=device).tril()
    model.forward(cache, prompt, torch.arange(prompt_length, device=device), causal)
    cache.advance(prompt_length)
    results = {}
    for size in sizes:
        parents = _bushy_parents(size)
        tokens = torch.randint(0, vocab, (size,), generator=generator).to(device)
        depths = torch.zeros(size, dtype=torch.long)
        for i in range(1, size):
            depths[i] = depths[parents[i]] + 1
        mask = tree_attention_mask(parents, device)
        streams = "all" if size > 1 and model.adapter is not None else None
        timings = []
        for _ in range(repeats + 1):  # the first is a warm-up
            _sync(device)
            started = time.perf_counter()
            out = model.forward(cache, tokens, depths.to(device) + prompt_length, mask, stream_sources=streams)
            model.logits(out.main_hidden).argmax(-1).tolist()
            if out.stream_hidden is not None:
                model.logits(out.stream_hidden[0]).topk(4, dim=-1)
            _sync(device)
            timings.append(time.perf_counter() - started)
        results[size] = statistics.median(timings[1:])
    return results
