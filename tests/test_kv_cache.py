"""The KV cache after keeping an accepted path equals the cache from re-encoding the kept sequence."""

import pytest
import torch

from specstream.kv_cache import KVCache
from specstream.streams import SpeculativeModel
from specstream.tree import tree_attention_mask

from .conftest import random_adapter


def encode(model, tokens):
    cache = model.new_cache(64)
    causal = torch.ones(len(tokens), len(tokens), dtype=torch.bool).tril()
    model.forward(cache, torch.tensor(tokens), torch.arange(len(tokens)), causal)
    cache.advance(len(tokens))
    return cache


@pytest.mark.parametrize("path, as_list", [([0, 1, 3, 5], False), ([0, 1, 3, 5], True), ([0, 1], True)])
def test_keep_accepted_path_equals_reencoding(tiny_base, path, as_list):
    """Also as a list, where a path already in place ([0, 1]: the tree's first branch) moves nothing."""
    model = SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, 0))
    prompt = [1, 8, 9, 10]
    parents = [-1, 0, 0, 1, 1, 3, 2]
    tokens = [5, 6, 7, 11, 12, 13, 14]
    depths = [0, 1, 1, 2, 2, 3, 2]
    with torch.inference_mode():
        cache = encode(model, prompt)
        model.forward(
            cache, torch.tensor(tokens), torch.tensor(depths) + len(prompt), tree_attention_mask(parents), stream_sources="all"
        )
        cache.keep(path if as_list else torch.tensor(path))
        expected = encode(model, prompt + [tokens[i] for i in path])
    assert cache.length == expected.length == len(prompt) + len(path)
    n = cache.length
    torch.testing.assert_close(cache.keys[:, :, :, :n], expected.keys[:, :, :, :n], atol=1e-10, rtol=0)
    torch.testing.assert_close(cache.values[:, :, :, :n], expected.values[:, :, :, :n], atol=1e-10, rtol=0)


def test_write_truncate_and_capacity():
    cache = KVCache(2, 1, 4, capacity=8, device="cpu", dtype=torch.float32)
    k = torch.ones(1, 1, 3, 4)
    keys, _ = cache.write(0, 0, k, k, span=3)
    assert keys.shape == (1, 1, 3, 4)
    cache.advance(3)
    cache.truncate(1)
    assert cache.length == 1
    try:
        cache.write(0, 1, k, k, span=9)
    except ValueError as error:
        assert "8 slots" in str(error)
    else:
        raise AssertionError("writing past capacity must fail")
