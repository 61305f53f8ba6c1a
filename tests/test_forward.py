"""Our forward pass against transformers' own Llama, and the tree mask against running paths alone."""

import random

import pytest
import torch
import torch.nn.functional as F

from specstream import llama
from specstream.llama import attention_backends, attention_bias, expand_groups
from specstream.loading import load_base_model, load_reference_model
from specstream.streams import SpeculativeModel
from specstream.tree import DraftNode, DraftTree, tree_attention_mask

from .conftest import random_adapter


def _prefill(model, tokens):
    cache = model.new_cache(len(tokens) + 128)
    causal = torch.ones(len(tokens), len(tokens), dtype=torch.bool).tril()
    out = model.forward(cache, torch.tensor(tokens), torch.arange(len(tokens)), causal)
    cache.advance(len(tokens))
    return cache, model.logits(out.main_hidden)


@pytest.mark.parametrize("kernels", [True, False])
def test_logits_match_transformers(tiny_dir, monkeypatch, kernels):
    """Ours against transformers, with the CPU kernels and in torch alone (the GPU's path, where queries
    and keys turn in one rotation)."""
    if not kernels:
        monkeypatch.setattr(llama.cpu_kernels, "fits", lambda *tensors: False)
    base = load_base_model(str(tiny_dir), device="cpu", dtype="float32")
    reference = load_reference_model(base)
    tokens = [1, 5, 9, 13, 7, 7, 20, 3, 11]
    with torch.inference_mode():
        expected = reference(torch.tensor([tokens])).logits[0]
        _, ours = _prefill(SpeculativeModel(base.weights, None), tokens)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


LLAMA3_SCALING = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


@pytest.mark.parametrize("rope", [LLAMA3_SCALING, {"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}])
def test_rotary_scaling_matches_transformers(tmp_path, rope):
    from .conftest import make_tiny_checkpoint

    base = load_base_model(str(make_tiny_checkpoint(tmp_path / "scaled", rope=rope)), device="cpu", dtype="float32")
    reference = load_reference_model(base)
    tokens = list(range(3, 24)) * 3  # past the original context of 32, where scaling matters
    with torch.inference_mode():
        expected = reference(torch.tensor([tokens])).logits[0]
        _, ours = _prefill(SpeculativeModel(base.weights, None), tokens)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_cached_step_matches_transformers(tiny_dir):
    base = load_base_model(str(tiny_dir), device="cpu", dtype="float32")
    reference = load_reference_model(base)
    tokens = [1, 5, 9, 13, 7, 7, 20, 3]
    model = SpeculativeModel(base.weights, None)
    with torch.inference_mode():
        expected = reference(torch.tensor([tokens + [4]])).logits[0, -1]
        cache, _ = _prefill(model, tokens)
        out = model.forward(cache, torch.tensor([4]), torch.tensor([len(tokens)]), torch.ones(1, 1, dtype=torch.bool))
    torch.testing.assert_close(model.logits(out.main_hidden[0]), expected, atol=1e-4, rtol=1e-4)


def random_tree(rng: random.Random, size: int, vocab: int) -> DraftTree:
    nodes = [DraftNode(rng.randrange(vocab), -1, 0, 1.0, 0, 1.0)]
    for _ in range(size - 1):
        parent = rng.randrange(len(nodes))
        nodes.append(DraftNode(rng.randrange(vocab), parent, nodes[parent].depth + 1, 0.5, 0, 0.5))
    return DraftTree(tuple(nodes))


def path_to(tree: DraftTree, node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = tree.nodes[node].parent
    return path[::-1]


@pytest.mark.parametrize("seed", range(4))
def test_tree_pass_equals_each_path_alone(tiny_base, seed):
    """Every node's main-stream logits from one tree pass equal those of running its path alone."""
    rng = random.Random(seed)
    vocab = tiny_base.weights.shape.vocab_size
    model = SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, seed))
    prompt = [rng.randrange(vocab) for _ in range(rng.randrange(1, 12))]
    tree = random_tree(rng, rng.randrange(2, 20), vocab)
    with torch.inference_mode():
        cache, _ = _prefill(model, prompt)
        positions = torch.tensor(tree.depths) + len(prompt)
        out = model.forward(cache, torch.tensor(tree.tokens), positions, tree_attention_mask(tree.parents), stream_sources="all")
        tree_logits = model.logits(out.main_hidden)
        for node in range(len(tree)):
            alone = [tree.tokens[i] for i in path_to(tree, node)]
            _, logits = _prefill(model, prompt + alone)
            torch.testing.assert_close(tree_logits[node], logits[-1], atol=1e-9, rtol=1e-9)


def test_pass_costs_are_measured_per_tree_size(tiny_base):
    from specstream.costs import pass_seconds

    model = SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, 0))
    costs = pass_seconds(model, [1, 4, 16], prompt_length=20, repeats=2)
    assert set(costs) == {1, 4, 16} and all(seconds > 0 for seconds in costs.values())


def test_attention_bias_gives_attention_the_same_bits_as_the_boolean_mask():
    """The forward pass converts a tree's mask once instead of in every layer; that must not change a bit."""
    generator = torch.Generator().manual_seed(0)
    rows, slots = 7, 40
    q = torch.randn(1, 6, rows, 16, generator=generator)
    k, v = torch.randn(2, 1, 2, slots, 16, generator=generator)
    mask = torch.rand(rows, slots, generator=generator) > 0.4
    mask[:, 0] = True
    bias = attention_bias(mask, torch.float32)
    assert bias.dtype == torch.float32 and (bias[mask] == 0).all() and torch.isinf(bias[~mask]).all()
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], enable_gqa=True)
    assert torch.equal(F.scaled_dot_product_attention(q, k, v, attn_mask=bias[None, None], enable_gqa=True), expected)


def test_gpu_passes_keep_cudnn_attention_out(monkeypatch):
    """cuDNN attention set itself up anew for every new key length: on an H200 a decoding step with it
    took 65 ms against 19 without. A pass on a GPU must leave it out, and leave the flags as it found them."""
    monkeypatch.delenv("SPECSTREAM_SDPA", raising=False)
    before = torch.backends.cuda.cudnn_sdp_enabled()
    with attention_backends(torch.device("cuda")):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with attention_backends(torch.device("cpu")):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before


@pytest.mark.parametrize("faster", ["native", "expand"])
def test_masked_attention_keeps_the_way_it_timed_faster(monkeypatch, faster):
    """On a GPU, masked attention repeats the key and value heads or not, whichever the first masked
    call timed faster (on an H200 the grouped call found only the math kernel); both give the same attention."""
    monkeypatch.delenv("SPECSTREAM_GQA", raising=False)
    monkeypatch.setattr(llama, "_GROUPS_CHOICE", {})
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(1, 6, 5, 16, generator=generator)
    k, v = torch.randn(2, 1, 2, 30, 16, generator=generator)
    mask = attention_bias(torch.rand(5, 30, generator=generator) > 0.3, torch.float32)[None, None]
    timed = []

    def timer(call):  # the slow way's calls "take" a second
        started = len(calls)
        call()
        timed.append(calls[started:])
        return 1.0 if calls[-1] != faster else 0.5

    calls = []
    for name in ("native", "expand"):
        way = getattr(llama, "_grouped_attention" if name == "native" else "_expanded_attention")
        monkeypatch.setattr(llama, way.__name__, lambda *args, way=way, name=name: calls.append(name) or way(*args))
    assert expand_groups(q, k, v, mask, timer) == (faster == "expand")
    assert len(timed) == 6 and sorted(calls) == ["expand"] * 4 + ["native"] * 4  # one warm-up and three timed each
    assert expand_groups(q, k, v, mask, lambda call: 1 / 0) == (faster == "expand")  # timed once per device and dtype
    assert llama.masked_attention_way(torch.device("cpu")) == faster  # as the benchmark's JSON reports it
    monkeypatch.setenv("SPECSTREAM_GQA", "native")
    assert not expand_groups(q, k, v, mask)
    grouped, expanded = llama._grouped_attention(q, k, v, mask), llama._expanded_attention(q, k, v, mask)
    assert torch.allclose(grouped, expanded, atol=1e-6)
