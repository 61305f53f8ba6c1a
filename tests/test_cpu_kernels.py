"""The CPU kernels: right results, rows independent of each other, and a clean fallback."""

from __future__ import annotations

import pytest
import torch

from specstream import cpu_kernels


@pytest.fixture
def kernel():
    if cpu_kernels.load_library() is None:
        pytest.skip("the CPU kernels cannot be built on this machine")
    return cpu_kernels


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """Forget the loaded kernel, and build any new one into an empty cache folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cpu_kernels.load_library.cache_clear()
    yield
    cpu_kernels.load_library.cache_clear()


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
    x = torch.randn(40, 80, generator=generator)  # several row blocks on either path
    together = packed(x)
    for row in range(40):
        assert torch.equal(packed(x[row : row + 1])[0], together[row])


@pytest.mark.parametrize("rows", [1, 3, 12, 13, 16, 17, 40])
def test_avx512_and_avx2_paths_give_the_same_bits(kernel, rows):
    """A token's bits must not depend on which machine of the fleet decoded it (only meaningful
    where the CPU has AVX-512; elsewhere both calls take the AVX2 path)."""
    generator = torch.Generator().manual_seed(rows)
    packed = kernel.pack(torch.randn(70, 576, generator=generator))
    x = torch.randn(rows, 576, generator=generator)
    assert torch.equal(packed(x), packed(x, avx2_only=True))


def test_refuses_what_it_cannot_do(kernel):
    weight = torch.randn(16, 8)
    packed = kernel.pack(weight)
    assert not packed.accepts(torch.randn(1, 8, dtype=torch.float64))
    assert not packed.accepts(torch.randn(0, 8))
    assert not packed.accepts(torch.randn(1, 8, requires_grad=True))
    assert kernel.pack(weight.double()) is None
    assert kernel.pack(weight.clone().requires_grad_(True)) is None


def test_switched_off_by_environment(monkeypatch, fresh_library):
    monkeypatch.setenv("SPECSTREAM_CPU_KERNELS", "0")
    assert cpu_kernels.pack(torch.randn(4, 4)) is None


def test_a_failed_build_warns_and_falls_back(monkeypatch, fresh_library):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    if cpu_kernels._unsupported_reason():
        pytest.skip("the kernel does not apply to this machine at all")
    with pytest.warns(UserWarning, match="could not be built"):
        assert cpu_kernels.pack(torch.randn(4, 4)) is None


def test_the_forward_pass_uses_it(kernel, tiny_dir, monkeypatch):
    from specstream.loading import load_base_model
    from specstream.streams import SpeculativeModel

    base = load_base_model(str(tiny_dir), device="cpu", dtype="float32")

    calls = []
    original = kernel.PackedMatrix.__call__
    monkeypatch.setattr(kernel.PackedMatrix, "__call__", lambda self, x: calls.append(x.shape) or original(self, x))
    monkeypatch.setattr(kernel, "WHOLE_LAYERS", False)  # op by op
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
    # A lossless adapter's pairs are packed in bfloat16: the products of the rounded weights.
    assert adapter.config.lossless and packed[key][0].bfloat16
    down = adapter.lora_down[key].bfloat16().float()
    up = (adapter.lora_up[key] * adapter.lora_scale).bfloat16().float()
    expected = outputs.clone()
    expected[:, 2:] += (inputs[:, 2:] @ down.T) @ up.T
    torch.testing.assert_close(fast, expected, rtol=1e-5, atol=1e-5)
    correction = (plain - outputs)[:, 2:]
    assert (fast - plain).abs().max() <= 0.02 * correction.abs().max()  # bfloat16 moves it by under 2 %
    assert not torch.equal(plain[:, 2:], outputs[:, 2:])  # the correction is not empty
    assert torch.equal(fast[:, :2], outputs[:, :2])  # main rows untouched


def test_rms_norm_matches_torch_row_by_row(kernel):
    from specstream import llama

    x, weight = torch.randn(2, 5, 64) * 3, torch.randn(64)
    with torch.inference_mode():
        fused = kernel.rms_norm(x, weight, 1e-5)
        x32 = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
        torch.testing.assert_close(fused, weight * x32, rtol=1e-5, atol=1e-5)
        assert torch.equal(kernel.rms_norm(x[1, 3:4], weight, 1e-5)[0], fused[1, 3])
        assert torch.equal(llama.rms_norm(x, weight, 1e-5), fused)  # the forward pass takes this path
    grad = torch.randn(3, 64, requires_grad=True)
    assert not kernel.fits(grad, weight)  # training keeps torch's differentiable ops


def test_rotary_in_place_matches_the_torch_rotation(kernel):
    from specstream.llama import _rotate

    heads, kv_heads, head_dim, rows = 3, 1, 32, 4
    qkv = torch.randn(2, rows, (heads + 2 * kv_heads) * head_dim)
    angles = torch.randn(rows, head_dim // 2)
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    q = qkv[..., : heads * head_dim].reshape(2, rows, heads, head_dim).transpose(1, 2)
    k = qkv[..., heads * head_dim : (heads + kv_heads) * head_dim].reshape(2, rows, kv_heads, head_dim).transpose(1, 2)
    expected_q, expected_k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    values = qkv[..., (heads + kv_heads) * head_dim :].clone()
    kernel.rotary(qkv, heads + kv_heads, head_dim, cos, sin)
    rotated_q = qkv[..., : heads * head_dim].reshape(2, rows, heads, head_dim).transpose(1, 2)
    rotated_k = qkv[..., heads * head_dim : (heads + kv_heads) * head_dim].reshape(2, rows, kv_heads, head_dim).transpose(1, 2)
    torch.testing.assert_close(rotated_q, expected_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rotated_k, expected_k, rtol=1e-5, atol=1e-5)
    assert torch.equal(qkv[..., (heads + kv_heads) * head_dim :], values)  # values are not rotated


def test_concurrent_callers_each_get_their_own_product(kernel):
    """Two sessions of the app may multiply at once (ctypes lets go of the GIL): no call may see
    another's rows."""
    import threading

    weight = torch.randn(1000, 64)
    packed = kernel.pack(weight)
    failures = []

    def multiply(seed):
        generator = torch.Generator().manual_seed(seed)
        for _ in range(100):
            x = torch.randn(5, 64, generator=generator)
            if not torch.allclose(packed(x), x @ weight.T, atol=1e-4):
                failures.append(seed)

    threads = [threading.Thread(target=multiply, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures


@pytest.mark.parametrize("rows", [1, 6, 17])
def test_bfloat16_weights_give_the_products_of_the_rounded_weights(kernel, rows):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(37, 64, generator=generator)
    x = torch.randn(rows, 64, generator=generator)
    packed = kernel.pack(weight, bfloat16=True)
    rounded = weight.to(torch.bfloat16).float()
    torch.testing.assert_close(packed(x), x @ rounded.T, rtol=1e-5, atol=1e-5)
    assert not torch.equal(packed(x), kernel.pack(weight)(x))  # it is not the float32 product


@pytest.fixture(params=["widening", "amx", "dot"])
def screened(kernel, request):
    """ExactArgmax on each screen: bfloat16 weights widened to float32 (any AVX2 CPU), AMX tiles, or
    AVX512-BF16 dot products."""
    library = kernel.load_library()
    if request.param == "amx" and not library.amx:
        pytest.skip("this CPU has no AMX")
    if request.param == "dot" and not library.bf16_dot:
        pytest.skip("this CPU has no AVX512-BF16")
    return lambda head: kernel.ExactArgmax(head, library, screen=request.param)


@pytest.mark.parametrize("rows", [1, 5, 13, 25])
def test_bfloat16_dot_screen_is_the_product_of_the_rounded_rows_and_weights(kernel, rows):
    # 37 columns: three tiles, so the last pair of tiles has one; 13 and 25 rows take several blocks.
    library = kernel.load_library()
    if not library.bf16_dot:
        pytest.skip("this CPU has no AVX512-BF16")
    generator = torch.Generator().manual_seed(rows)
    head, x = torch.randn(37, 96, generator=generator), torch.randn(rows, 96, generator=generator)
    screened, moved = kernel.ExactArgmax(head, library, screen="dot")._screen(x)
    narrow = x.to(torch.bfloat16)
    exact = narrow.double() @ head.to(torch.bfloat16).double().T
    torch.testing.assert_close(screened.double(), exact, rtol=1e-6, atol=1e-5)
    assert torch.allclose(moved, (x.double() - narrow.double()).norm(dim=1))


def test_screened_argmax_is_the_float32_argmax_even_on_near_ties(kernel, screened):
    """Greedy decoding's token must be the float32 head's argmax, bit for bit: rows below bfloat16's
    resolution apart, exact ties (the lowest index wins, as with torch.argmax) and ordinary rows."""
    generator = torch.Generator().manual_seed(0)
    head = torch.randn(3000, 576, generator=generator) * 0.05
    nudge = torch.zeros(576)
    nudge[::7] = 1e-5  # far below bfloat16's resolution: the screen cannot tell these rows apart
    head[2001] = head[1000] + nudge
    head[2002] = head[1000] - nudge
    head[2500] = head[1500]  # an exact tie
    hidden = torch.cat([head[[1000, 1500, 7, 2999]] * 40, torch.randn(60, 576, generator=generator) * 3])
    hidden[:2] += torch.randn(2, 576, generator=generator) * 0.5
    best, candidates = screened(head)(hidden)
    assert best == kernel.pack(head)(hidden).argmax(-1).tolist()
    assert best[0] in (1000, 2001, 2002) and candidates[0] >= 3  # the near-ties were all recomputed
    assert best[1] == 1500  # the lower index of an exact tie
    assert max(candidates[4:]) < 20  # ordinary rows recompute a handful of columns, not the head


def test_screened_argmax_picks_what_the_screen_alone_would_miss(kernel, screened):
    generator = torch.Generator().manual_seed(1)
    # Weights exactly representable in bfloat16, so a twin a hair away rounds to the same bfloat16 row.
    head = (torch.randn(200, 576, generator=generator) * 0.05).to(torch.bfloat16).float()
    hidden = torch.randn(64, 576, generator=generator) * 20
    # Each row's best column gets a twin at a higher index, a hair better: only the float32 recompute sees it.
    exact = kernel.pack(head)(hidden).argmax(-1)
    widened = torch.cat([head, head[exact] * (1 + 1e-5 * torch.sign(hidden * head[exact]))])
    best, _ = screened(widened)(hidden)
    expected = kernel.pack(widened)(hidden).argmax(-1).tolist()
    assert best == expected
    assert all(b >= 200 for b in best)  # the twins, which the screen ranks level with their originals
    screen_alone = kernel.pack(widened, bfloat16=True)(hidden).argmax(-1).tolist()
    assert screen_alone == exact.tolist()


def _attention_inputs(heads, kv_heads, head_dim, rows, span, seed=0, capacity=None):
    generator = torch.Generator().manual_seed(seed)
    capacity = capacity or span + 8
    keys = torch.randn(kv_heads, capacity, head_dim, generator=generator)
    values = torch.randn(kv_heads, capacity, head_dim, generator=generator)
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=generator)
    return qkv, keys, values


# (9, 3, 64) is SmolLM2-135M's shape (the AVX-512 path where the CPU has it); head_dim 16 and a group
# of 6 query heads per key/value head take the AVX2 path everywhere.
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 2, 16), (6, 1, 64)])
@pytest.mark.parametrize("rows", [1, 5, 19])
def test_attention_matches_torch(kernel, heads, kv_heads, head_dim, rows):
    span = 37
    qkv, keys, values = _attention_inputs(heads, kv_heads, head_dim, rows, span, seed=rows)
    visible = torch.rand(rows, span, generator=torch.Generator().manual_seed(1)) > 0.4
    visible[:, 3] = True
    for bias in (None, torch.zeros(rows, span).masked_fill_(~visible, float("-inf"))):
        out = kernel.attend_rows(qkv, heads, head_dim, keys, values, span, bias)
        q = qkv[:, : heads * head_dim].view(rows, heads, head_dim).transpose(0, 1)[None]
        expected = torch.nn.functional.scaled_dot_product_attention(
            q, keys[None, :, :span], values[None, :, :span], attn_mask=None if bias is None else bias[None, None],
            enable_gqa=True,
        )[0].transpose(0, 1).reshape(rows, heads * head_dim)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 2, 16)])
def test_a_row_attends_with_the_same_bits_wherever_its_keys_lie(kernel, heads, kv_heads, head_dim):
    """A tree node sees the prefix and its ancestors scattered among other nodes' slots; plain decoding
    later sees the same keys side by side. Both must give the same bits, whatever else is in the call."""
    span = 50
    qkv, keys, values = _attention_inputs(heads, kv_heads, head_dim, 3, span)
    seen = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 20, 33, 49])
    visible = torch.rand(3, span, generator=torch.Generator().manual_seed(2)) > 0.5
    visible[1] = False
    visible[1, seen] = True
    bias = torch.zeros(3, span).masked_fill_(~visible, float("-inf"))
    in_a_tree = kernel.attend_rows(qkv, heads, head_dim, keys, values, span, bias)[1]
    packed_keys, packed_values = keys.clone(), values.clone()
    packed_keys[:, : len(seen)], packed_values[:, : len(seen)] = keys[:, seen], values[:, seen]
    alone = kernel.attend_rows(qkv[1:2], heads, head_dim, packed_keys, packed_values, len(seen), None)[0]
    assert torch.equal(in_a_tree, alone)


def test_write_kv_fills_the_given_slots(kernel):
    heads, kv_heads, head_dim = 4, 2, 16
    qkv, keys, values = _attention_inputs(heads, kv_heads, head_dim, 3, 10)
    k = qkv[:, heads * head_dim : (heads + kv_heads) * head_dim].view(3, kv_heads, head_dim).transpose(0, 1)
    v = qkv[:, (heads + kv_heads) * head_dim :].view(3, kv_heads, head_dim).transpose(0, 1)
    for slots, where in ((4, [4, 5, 6]), (torch.tensor([9, 2, 7]), [9, 2, 7])):
        before_keys, before_values = keys.clone(), values.clone()
        kernel.write_kv(qkv, heads, head_dim, keys, values, slots)
        assert torch.equal(keys[:, where], k) and torch.equal(values[:, where], v)
        untouched = [s for s in range(keys.shape[1]) if s not in where]
        assert torch.equal(keys[:, untouched], before_keys[:, untouched])
        assert torch.equal(values[:, untouched], before_values[:, untouched])


def test_every_pass_runs_whole_layers_in_the_kernel(kernel, tiny_dir, monkeypatch):
    from specstream.loading import load_base_model
    from specstream.streams import SpeculativeModel

    base = load_base_model(str(tiny_dir), device="cpu", dtype="float32")
    model = SpeculativeModel(base.weights, None)
    calls = []
    original = kernel.LayerStack.__call__
    monkeypatch.setattr(kernel.LayerStack, "__call__",
                        lambda self, x, *a, **k: calls.append((x.shape[0], self.layers)) or original(self, x, *a, **k))
    with torch.inference_mode():
        cache = model.new_cache(16)
        model.forward(cache, torch.arange(1, 7), torch.arange(6), torch.ones(6, 6, dtype=torch.bool).tril())
        cache.advance(6)
        model.forward(cache, torch.tensor([3, 4]), torch.tensor([6, 7]), torch.ones(2, 2, dtype=torch.bool).tril())
    layers = base.weights.shape.num_layers
    # The prompt's rows, then the pass's: every layer, the layers below the streams and the (here
    # adapter-less) stream layers each in one call.
    assert sum(count for rows, count in calls if rows == 6) == layers
    assert sum(count for rows, count in calls if rows == 2) == layers and len(calls) <= 4


def test_whole_layer_kernel_matches_the_layer_op_by_op(kernel, tiny_dir, monkeypatch):
    """Decoding passes run each layer in one C call (with the adapter's low-rank pairs on the stream
    rows); the same pass op by op gives the same hidden states and cache, up to float rounding."""
    from specstream.loading import load_base_model
    from specstream.streams import SpeculativeModel
    from specstream.tree import tree_attention_mask

    from .conftest import random_adapter

    base = load_base_model(str(tiny_dir), device="cpu", dtype="float32")
    model = SpeculativeModel(base.weights, random_adapter(base, seed=5).float())
    assert model._lora_kernels  # every stream layer's pairs are packed
    calls = []
    original = kernel.LayerStack.__call__
    monkeypatch.setattr(kernel.LayerStack, "__call__", lambda self, *a, **k: calls.append(self.layers) or original(self, *a, **k))
    results = []
    with torch.inference_mode():
        for whole in (True, False):
            monkeypatch.setattr(kernel, "WHOLE_LAYERS", whole)
            cache = model.new_cache(32)
            model.forward(cache, torch.arange(1, 9), torch.arange(8), torch.ones(8, 8, dtype=torch.bool).tril())
            cache.advance(8)
            parents = [-1, 0, 0, 1]
            out = model.forward(cache, torch.tensor([3, 4, 5, 6]), torch.tensor([8, 9, 9, 10]),
                                tree_attention_mask(parents, "cpu"), stream_sources="all")
            results.append((out.main_hidden, out.stream_hidden, cache.keys.clone(), cache.values.clone()))
    assert sum(calls) == 2 * base.weights.shape.num_layers  # the prompt and the tree pass, every layer
    for fused, op_by_op in zip(*results):
        torch.testing.assert_close(fused, op_by_op, rtol=1e-4, atol=1e-4)


def int8_rows_in_torch(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference for `int8_rows`: each row as int8 times (its largest magnitude over 127)."""
    scales = matrix.abs().amax(dim=1).clamp_min(1e-30) / 127
    return scales, (matrix / scales[:, None]).round().clamp(-127, 127).to(torch.int8)


def test_int8_draft_head_gives_the_products_of_the_rounded_rows_and_weights(kernel):
    weight = torch.randn(100, 128, generator=torch.Generator().manual_seed(4))  # 100: not a multiple of 16
    head = kernel.pack_draft_head(weight)
    if not isinstance(head, kernel.Int8Matrix):
        pytest.skip("int8 draft heads need AMX; this CPU keeps the bfloat16 head")
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        out = head(x)
    w_scale, w_int = int8_rows_in_torch(weight)
    x_scale, x_int = int8_rows_in_torch(x)
    exact = (x_int.double() @ w_int.double().T) * x_scale.double()[:, None] * w_scale.double()[None]
    torch.testing.assert_close(out.double(), exact, rtol=1e-6, atol=1e-6)
    reference = x @ weight.T
    assert (out - reference).abs().max() < 0.03 * reference.abs().max()  # about 1 % of the largest logit


def test_int8_rows_in_c_round_as_torch_does(kernel):
    x = torch.randn(5, 192, generator=torch.Generator().manual_seed(8)) * torch.tensor([1.0, 1e-3, 50.0, 0.0, 1.0])[:, None]
    x[4, 7] = 127.5 / 127 * x[4].abs().max()  # halves that round to even
    scales, rows = kernel.int8_rows(x)
    torch_scales, torch_rows = int8_rows_in_torch(x)
    assert torch.equal(scales, torch_scales) and torch.equal(rows, torch_rows)


def test_top_probabilities_are_softmax_then_top_k(kernel):
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(9)) * 4
    logits[1, 500] = logits[1, 20] = 40.0  # a tie: the lower column first, as the drafts rank it
    probs, columns = kernel.top_probabilities(logits, 6)
    expected_probs, expected_columns = torch.softmax(logits.double(), dim=-1).topk(6, dim=-1)
    assert torch.equal(columns[[0, 2]], expected_columns[[0, 2]]) and columns[1, :2].tolist() == [20, 500]
    torch.testing.assert_close(probs.double(), expected_probs, rtol=1e-5, atol=1e-7)


def q4_like(weight: torch.Tensor) -> torch.Tensor:
    """The weight rounded as GGUF's Q4_1 does (per 32 k: least value m and d = span / 15, both half
    precision; q = round((w - m) / d)) and de-quantized in float32, as the default model's body is."""
    rows, width = weight.shape
    blocks = weight.view(rows, width // 32, 32)
    least, span = blocks.amin(-1), blocks.amax(-1) - blocks.amin(-1)
    d, m = (span / 15).half().float(), least.half().float()
    q = torch.where(d[..., None] > 0, (blocks - least[..., None]) / d[..., None].clamp_min(1e-30) + 0.5, 0).floor().clamp(0, 15)
    return (q * d[..., None] + m[..., None]).view(rows, width)


def test_exact_4bit_weights_give_the_float32_kernels_bits(kernel):
    weight = q4_like(torch.randn(40, 96, generator=torch.Generator().manual_seed(12)))  # 40 rows: 3 tiles, one short
    codes = kernel.q4_matrix(weight)
    if codes is None:
        assert torch.backends.cpu.get_cpu_capability() != "AVX512"
        pytest.skip("4-bit codes need AVX-512")
    library = kernel.load_library()
    for rows in (1, 2, 7, 8, 9, 17):
        x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows))
        out = torch.empty(rows, 40)
        library.q4_gemm(x.data_ptr(), rows, 96, codes.codes.data_ptr(), codes.scales.data_ptr(), 40, out.data_ptr(), 2)
        assert torch.equal(out, kernel.pack(weight)(x))


def test_weights_that_are_not_exact_4bit_codes_are_not_read_as_codes(kernel):
    weight = q4_like(torch.randn(32, 64, generator=torch.Generator().manual_seed(13)))
    if kernel.q4_matrix(weight) is None:
        pytest.skip("4-bit codes need AVX-512")
    weight[5, 7] = torch.nextafter(weight[5, 7], torch.tensor(1.0))  # one weight off by one unit
    assert kernel.q4_matrix(weight) is None
    assert kernel.q4_matrix(torch.randn(32, 64)) is None


def test_a_model_with_4bit_weights_decodes_the_same_bits_either_way(kernel, tiny_dir, monkeypatch):
    from specstream.loading import load_base_model
    from specstream.streams import SpeculativeModel

    from .conftest import random_adapter

    base = load_base_model(str(tiny_dir), device="cpu", dtype="float32")
    for layer in base.weights.layers:
        for name in ("qkv", "o", "gate_up", "down"):
            setattr(layer, name, q4_like(getattr(layer, name)))
    if not all(len(layer.codes) == 4 for layer in base.weights.layers):
        pytest.skip("4-bit codes need AVX-512")
    model = SpeculativeModel(base.weights, random_adapter(base, seed=6).float())
    results = []
    with torch.inference_mode():
        for exact in (False, True):
            monkeypatch.setattr(kernel, "EXACT_4BIT", exact)
            for layer in base.weights.layers:
                layer.__dict__.pop("_kernel", None)
            base.weights.__dict__.pop("_stacks", None)
            cache = model.new_cache(32)
            out = model.forward(cache, torch.arange(1, 9), torch.arange(8), torch.ones(8, 8, dtype=torch.bool).tril(),
                                stream_sources="all")
            results.append((out.main_hidden, out.stream_hidden, cache.keys.clone()))
    assert "4-bit" in base.weights.matmul
    for plain_weights, codes in zip(*results):
        assert torch.equal(plain_weights, codes)


def test_layer_stacks_of_replaced_adapters_are_let_go(kernel, tiny_dir):
    """Each adapter's stream layers get their own stack; a running app that swaps adapters must not keep
    every old adapter's packed pairs alive through the cache."""
    import gc
    import weakref

    from specstream import llama
    from specstream.loading import load_base_model
    from specstream.streams import SpeculativeModel

    from .conftest import random_adapter

    base = load_base_model(str(tiny_dir), device="cpu", dtype="float32")
    first = SpeculativeModel(base.weights, random_adapter(base, seed=7).float())
    alive = weakref.ref(next(iter(first._lora_kernels.values())))
    with torch.inference_mode():
        for seed in range(llama.MAX_LAYER_STACKS + 1):
            model = first if seed == 0 else SpeculativeModel(base.weights, random_adapter(base, seed=seed).float())
            model.forward(model.new_cache(8), torch.arange(1, 4), torch.arange(3), torch.ones(3, 3, dtype=torch.bool).tril(),
                          stream_sources="last")
    assert len(base.weights.__dict__["_stacks"]) <= llama.MAX_LAYER_STACKS
    del first, model
    gc.collect()
    assert alive() is None
