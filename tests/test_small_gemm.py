"""The small-row CPU kernel: right products, rows independent of each other, and a clean fallback."""

from __future__ import annotations

import pytest
import torch

from specstream import small_gemm


@pytest.fixture
def kernel():
    if small_gemm.load_library() is None:
        pytest.skip("the small-row kernel cannot be built on this machine")
    return small_gemm


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """Forget the loaded kernel, and build any new one into an empty cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    small_gemm.load_library.cache_clear()
    yield
    small_gemm.load_library.cache_clear()


@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, 64])
def test_products_match_torch(kernel, rows):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(37, 51, generator=generator)  # neither size a multiple of the 16-column tile
    x = torch.randn(2, rows, 51, generator=generator)
    packed = kernel.pack(weight)
    with torch.inference_mode():
        assert packed.accepts(x)
        torch.testing.assert_close(packed(x), x @ weight.T, rtol=1e-5, atol=1e-5)


def test_a_row_gives_the_same_bits_alone_or_with_others(kernel):
    """Why verification matches plain decoding exactly: the tree's rows do not change each other."""
    generator = torch.Generator().manual_seed(0)
    packed = kernel.pack(torch.randn(100, 80, generator=generator))
    x = torch.randn(11, 80, generator=generator)
    together = packed(x)
    for row in range(11):
        assert torch.equal(packed(x[row : row + 1])[0], together[row])


def test_refuses_what_it_cannot_do(kernel):
    weight = torch.randn(16, 8)
    packed = kernel.pack(weight)
    assert not packed.accepts(torch.randn(1, 8, dtype=torch.float64))
    assert not packed.accepts(torch.randn(0, 8))
    assert not packed.accepts(torch.randn(1, 8, requires_grad=True))
    assert kernel.pack(weight.double()) is None
    assert kernel.pack(weight.clone().requires_grad_(True)) is None


def test_switched_off_by_environment(monkeypatch, fresh_library):
    monkeypatch.setenv("SPECSTREAM_SMALL_GEMM", "0")
    assert small_gemm.pack(torch.randn(4, 4)) is None


def test_a_failed_build_warns_and_falls_back(monkeypatch, fresh_library):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    if small_gemm._unsupported_reason():
        pytest.skip("the kernel does not apply to this machine at all")
    with pytest.warns(UserWarning, match="could not be built"):
        assert small_gemm.pack(torch.randn(4, 4)) is None


def test_the_forward_pass_uses_it(kernel, tiny_dir, monkeypatch):
    from specstream.loading import load_base_model
    from specstream.streams import SpeculativeModel

    base = load_base_model(str(tiny_dir), device="cpu", dtype="float32")

    calls = []
    original = kernel.PackedMatrix.__call__
    monkeypatch.setattr(kernel.PackedMatrix, "__call__", lambda self, x: calls.append(x.shape) or original(self, x))
    model = SpeculativeModel(base.weights, None)
    cache = model.new_cache(8)
    with torch.inference_mode():
        out = model.forward(cache, torch.tensor([1, 2]), torch.arange(2), torch.ones(2, 2, dtype=torch.bool).tril())
        model.logits(out.main_hidden)
    assert len(calls) == 4 * base.weights.shape.num_layers + 1  # four projections a layer, then the head


def test_packed_low_rank_pairs_match_the_adapter(kernel, tiny_dir):
    from specstream.loading import load_base_model
    from specstream.streams import LoraDelta, pack_lora

    from .conftest import random_adapter

    base = load_base_model(str(tiny_dir), device="cpu", dtype="float32")
    adapter = random_adapter(base, seed=3).float().requires_grad_(False)
    packed = pack_lora(adapter)
    assert set(packed) == set(adapter.lora_down)
    key = next(iter(adapter.lora_down))
    layer, target = key.split("_", 1)
    inputs = torch.randn(1, 7, adapter.lora_down[key].shape[1])
    outputs = torch.randn(1, 7, adapter.lora_up[key].shape[0])
    with torch.inference_mode():
        plain = LoraDelta(adapter, int(layer), 2)(target, inputs, outputs.clone())
        fast = LoraDelta(adapter, int(layer), 2, packed)(target, inputs, outputs.clone())
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    assert not torch.equal(plain[:, 2:], outputs[:, 2:])  # the correction is not empty
