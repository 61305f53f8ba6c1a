"""A KV cache allocated once per sequence, with the three operations speculative decoding needs.

Slots `[0, length)` hold the committed sequence. A forward pass writes its rows past `length`
(the tree's main-stream nodes, then scratch rows for speculative streams, which are never
committed); afterwards `keep` moves the accepted nodes' entries to contiguous slots and commits
them, and everything past the new length is garbage that the next pass overwrites.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int, *, device, dtype):
        shape = (num_layers, 1, num_kv_heads, capacity, head_dim)
        # Zeros, not empty: masked-out slots still enter the attention matmul, and stale NaNs
        # there would poison whole rows.
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.capacity = capacity
        self.length = 0

    def write(self, layer: int, slots: torch.Tensor | int, k: torch.Tensor, v: torch.Tensor, span: int):
        """Write k, v (1, Hkv, R, hd) at `slots` (a start slot, or R slot indices) and return every
        key and value in `[0, span)`."""
        if span > self.capacity:
            raise ValueError(f"KV cache holds {self.capacity} slots; this pass needs {span}")
        if isinstance(slots, int):
            self.keys[layer, :, :, slots : slots + k.shape[2]] = k
            self.values[layer, :, :, slots : slots + v.shape[2]] = v
        else:
            self.keys[layer].index_copy_(2, slots, k)
            self.values[layer].index_copy_(2, slots, v)
        return self.keys[layer, :, :, :span], self.values[layer, :, :, :span]

    def slots(self, layer: int, slots: torch.Tensor | int, span: int) -> CacheSlots:
        """Where one layer of a pass writes its rows and how far it reads: the `kv` of a decoder layer."""
        return CacheSlots(self, layer, slots, span)

    def keep(self, offsets: torch.Tensor | list[int]) -> None:
        """Commit the entries written at slots `length + offsets`, moved to contiguous slots."""
        if not isinstance(offsets, torch.Tensor):
            if offsets == list(range(len(offsets))):  # already in place (a tree's first branch)
                self.advance(len(offsets))
                return
            offsets = torch.tensor(offsets)
        count = int(offsets.numel())
        source = offsets.to(self.keys.device) + self.length
        target = slice(self.length, self.length + count)
        self.keys[:, :, :, target] = self.keys.index_select(3, source)
        self.values[:, :, :, target] = self.values.index_select(3, source)
        self.length += count

    def advance(self, count: int) -> None:
        """Commit the `count` entries written right after the committed prefix, as they are."""
        self.length += count

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length


class CacheSlots:
    """One layer's share of a pass: called with the new keys and values, writes them at `slots` and
    returns every key and value below `span`."""

    def __init__(self, cache: KVCache, layer: int, slots: torch.Tensor | int, span: int):
        if span > cache.capacity:
            raise ValueError(f"KV cache holds {cache.capacity} slots; this pass needs {span}")
        self.cache, self.layer, self.slots, self.span = cache, layer, slots, span

    def __call__(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.write(self.layer, self.slots, k, v, self.span)
