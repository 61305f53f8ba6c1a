"""Multi-stream attention: streams never change the main stream, and each stream sees exactly
the main stream up to its own position and the streams before it at that position."""

import pytest
import torch

from specstream.streams import SpeculativeModel, stream_attention_mask
from specstream.training.features import Sequence, main_stream_features
from specstream.training.objective import StreamObjective

from .conftest import random_adapter

PROMPT = [1, 7, 9, 12, 4, 18, 6, 10, 15]


def run(model, tokens, gamma=None, sources="all"):
    return run_in(model, model.new_cache(len(tokens) * 8 + 32), tokens, gamma, sources)


def run_in(model, cache, tokens, gamma=None, sources=None):
    causal = torch.ones(len(tokens), len(tokens), dtype=torch.bool).tril()
    with torch.inference_mode():
        return model.forward(cache, torch.tensor(tokens), torch.arange(len(tokens)), causal, stream_sources=sources, gamma=gamma)


def test_streams_at_chosen_nodes_are_those_of_the_full_pass(tiny_base):
    """What stream_pass "likely" relies on: computing some nodes' streams leaves theirs unchanged."""
    model = SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, 4))
    every, some = run(model, PROMPT), run(model, PROMPT, sources=[0, 5, 8])
    assert some.stream_nodes == [0, 5, 8] and some.stream_hidden.shape[0] == 3
    for node in (0, 5, 8):
        torch.testing.assert_close(some.streams_of(node), every.streams_of(node), atol=1e-5, rtol=1e-5)
    assert some.streams_of(3) is None
    assert torch.equal(some.main_hidden, every.main_hidden)


def test_main_stream_ignores_stream_weights(tiny_base):
    plain = run(SpeculativeModel(tiny_base.weights, None), PROMPT)
    for seed in range(3):
        streamed = run(SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, seed)), PROMPT)
        assert torch.equal(streamed.main_hidden, plain.main_hidden)
        assert streamed.stream_hidden is not None


def test_streams_depend_on_their_weights(tiny_base):
    one = run(SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, 1)), PROMPT)
    two = run(SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, 2)), PROMPT)
    assert not torch.allclose(one.stream_hidden, two.stream_hidden)


def test_stream_sees_main_up_to_its_position_only(tiny_base):
    model = SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, 3))
    base_run = run(model, PROMPT)
    t = 4
    changed = PROMPT[: t + 1] + [(x + 1) % 20 + 3 for x in PROMPT[t + 1 :]]  # only the future changes
    future_changed = run(model, changed)
    torch.testing.assert_close(future_changed.stream_hidden[: t + 1], base_run.stream_hidden[: t + 1], atol=1e-10, rtol=0)
    past_changed = run(model, [PROMPT[0], 3] + PROMPT[2:])
    assert not torch.allclose(past_changed.stream_hidden[t], base_run.stream_hidden[t])


def test_stream_sees_earlier_streams_not_later(tiny_base):
    adapter = random_adapter(tiny_base, 4)
    model = SpeculativeModel(tiny_base.weights, adapter)
    full = run(model, PROMPT)
    # Streams 1..2 computed alone equal the first two of three: stream 3 is invisible to them.
    torch.testing.assert_close(run(model, PROMPT, gamma=2).stream_hidden, full.stream_hidden[:, :2], atol=1e-10, rtol=0)
    # Changing stream 1's embedding changes stream 2 (it sees stream 1).
    with torch.no_grad():
        model.adapter.stream_embeddings[0] += 1.0
    changed = run(model, PROMPT)
    assert not torch.allclose(changed.stream_hidden[:, 1], full.stream_hidden[:, 1])


def test_stream_attention_mask_layout():
    main = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)  # two main rows over three slots
    mask = stream_attention_mask(main, sources=[1], gamma=2)
    expected = torch.tensor(
        [
            [1, 1, 0, 0, 0],  # main rows never see streams
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],  # stream 1 of row 1: what row 1 sees, plus itself
            [1, 1, 1, 1, 1],  # stream 2: also stream 1
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("bonus_rank", [0, 4])
def test_training_computes_the_streams_the_decoder_computes(tiny_base, bonus_rank):
    """The objective's stream rows at position t are the ones the decoder's second pass computes at
    t, given the token after t as the bonus: an off-by-one there would train streams that no
    decoder ever runs."""
    adapter = random_adapter(tiny_base, 5, bonus_rank=bonus_rank)
    model = SpeculativeModel(tiny_base.weights, adapter)
    first_source = 3
    features = main_stream_features(tiny_base.weights, [Sequence(tuple(PROMPT), first_source)],
                                    model.first_stream_layer, True, torch.float64)
    with torch.no_grad():
        trained, _, start = StreamObjective(adapter, tiny_base.weights).top_layers(features)
    trained = trained[0].view(len(PROMPT) - start, model.gamma, -1)
    for t in range(first_source, len(PROMPT) - 1):
        cache = model.new_cache(len(PROMPT) + 8)
        out = run_in(model, cache, PROMPT[: t + 1])
        cache.advance(t + 1)
        with torch.inference_mode():
            decoded = model.streams_at_end(cache, out.early_hidden[-1], model.gamma, bonus=PROMPT[t + 1])
        torch.testing.assert_close(trained[t - start], decoded, atol=1e-9, rtol=1e-9)


def test_bonus_streams_read_the_bonus_token(tiny_base):
    model = SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, 6, bonus_rank=4))
    cache = model.new_cache(len(PROMPT) + 8)
    out = run_in(model, cache, PROMPT)
    cache.advance(len(PROMPT))
    with torch.inference_mode():
        one, two = (model.streams_at_end(cache, out.early_hidden[-1], model.gamma, bonus=b) for b in (7, 8))
        with pytest.raises(ValueError, match="bonus"):
            model.streams_at_end(cache, out.early_hidden[-1], model.gamma)
    with pytest.raises(ValueError, match="bonus"):  # a pass cannot carry them: it has no bonus yet
        run_in(model, model.new_cache(len(PROMPT) + 8), PROMPT, sources="all")
    assert model.streams_need_bonus and not torch.allclose(one, two)


def test_stream_attention_mask_without_sources_is_the_main_mask():
    """A deferred pass computes no streams; its mask (drawn by the app) is the tree's own."""
    main = torch.ones(3, 5, dtype=torch.bool).tril()
    assert torch.equal(stream_attention_mask(main, [], 3), main)
