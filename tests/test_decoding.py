"""Lossless: greedy specstream output equals greedy plain output, whatever the adapter."""

import random
from dataclasses import replace

import pytest
import torch

from specstream import decoding
from specstream.decoding import DecodeSettings, SettingsError, plain_decode, specstream_decode
from specstream.phrases import PhraseTable
from specstream.streams import SpeculativeModel
from specstream.tree import Fate

from .conftest import random_adapter, with_eos

WIDE = DecodeSettings(max_new_tokens=40, top_k=(6, 4, 3), node_budget=60, tree="fixed", stop_at_eos=False)


def tokens_of(records):
    return [t for r in records for t in r.emitted_tokens]


def decode_both(model, prompt, settings):
    plain = list(plain_decode(model, prompt, settings))
    spec = list(specstream_decode(model, prompt, settings))
    return plain, spec


@pytest.mark.parametrize("seed", range(6))
def test_specstream_equals_plain_for_random_adapters(tiny_base, seed):
    rng = random.Random(seed)
    model = SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, seed, gamma=rng.choice([1, 2, 3])))
    prompt = [rng.randrange(3, 24) for _ in range(rng.randrange(1, 10))]
    settings = DecodeSettings(
        max_new_tokens=rng.randrange(1, 50), top_k=(6, 4, 3), node_budget=rng.choice([1, 5, 60]),
        prune_threshold=rng.choice([0.0, 0.05]), lookup_tokens=rng.choice([0, 5]),
        stream_pass=rng.choice(["joint", "deferred", "likely"]), stop_at_eos=False,
    )
    plain, spec = decode_both(model, prompt, settings)
    assert tokens_of(spec) == tokens_of(plain)
    assert len(tokens_of(plain)) == settings.max_new_tokens
    assert plain[-1].finish_reason == spec[-1].finish_reason == "length"


@pytest.mark.parametrize("stream_pass", ["auto", "joint"])
def test_bonus_streams_are_lossless_and_always_take_the_second_pass(tiny_base, stream_pass):
    """Streams that read the bonus token exist only after verification, whatever the stream pass."""
    model = SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, 7, bonus_rank=4))
    settings = replace(WIDE, stream_pass=stream_pass)
    plain, spec = decode_both(model, [3, 9, 4], settings)
    assert tokens_of(spec) == tokens_of(plain)
    assert all(r.second_pass and not r.stream_nodes for r in spec[1:])
    assert any(r.accepted_length for r in spec[1:])


def test_records_are_consistent(tiny_base):
    model = SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, 7))
    _, spec = decode_both(model, [4, 5, 6], WIDE)
    assert spec[0].step == 0 and spec[0].nodes == ()
    accepted_any = False
    for record in spec[1:]:
        fates = [n.fate for n in record.nodes]
        assert [n.index for n in record.nodes if n.fate is Fate.ACCEPTED] == sorted(record.accepted_path)
        path_tokens = [record.nodes[i].token_id for i in record.accepted_path[1:]]
        assert list(record.emitted_tokens) == (path_tokens + [record.bonus_token])[: len(record.emitted_tokens)]
        assert record.nodes[record.accepted_path[-1]].main_choice == record.bonus_token
        for node in record.nodes[1:]:
            parent = record.nodes[node.parent]
            if node.fate is Fate.REJECTED:
                assert parent.fate is Fate.ACCEPTED and parent.main_choice != node.token_id
        accepted_any |= record.accepted_length > 0
        assert Fate.PRUNED not in fates  # pruning is off in WIDE
        assert record.seconds > 0
    assert accepted_any, "the wide tree on a tiny vocabulary should accept something"
    assert spec[-1].tokens_per_pass > 1.0
    assert spec[-1].forward_passes == len(spec)


def test_end_of_sequence_inside_an_accepted_path(tiny_base):
    """Stop exactly at EOS even when it falls inside a pass's accepted tokens."""
    hits = 0
    for seed in range(8):
        model = SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, seed))
        free_run = tokens_of(plain_decode(model, [seed + 3, 9], WIDE))
        eos = next((t for i, t in enumerate(free_run) if i >= 2 and t not in free_run[:i]), None)
        if eos is None:
            continue
        stopping = with_eos(model, eos)
        settings = DecodeSettings(max_new_tokens=40, top_k=(6, 4, 3), node_budget=60, tree="fixed")
        plain, spec = decode_both(stopping, [seed + 3, 9], settings)
        assert tokens_of(spec) == tokens_of(plain) == free_run[: free_run.index(eos) + 1]
        assert spec[-1].finish_reason == "eos"
        last = spec[-1]
        hits += len(last.emitted_tokens) < last.accepted_length + 1
    assert hits > 0, "no run stopped inside an accepted path; the test lost its point"


def test_token_limit_inside_an_accepted_path(tiny_base):
    hits = 0
    for seed in range(8):
        model = SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, seed))
        for limit in (2, 3, 5, 8):
            settings = DecodeSettings(max_new_tokens=limit, top_k=(6, 4, 3), node_budget=60, tree="fixed", stop_at_eos=False)
            plain, spec = decode_both(model, [seed + 3, 9, 11], settings)
            assert tokens_of(spec) == tokens_of(plain) and len(tokens_of(spec)) == limit
            hits += len(spec[-1].emitted_tokens) < spec[-1].accepted_length + 1
    assert hits > 0


def test_empty_reply(tiny_base):
    """EOS as the very first token: both decoders emit just it."""
    model = SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, 0))
    first = tokens_of(plain_decode(model, [5, 6], DecodeSettings(max_new_tokens=1)))[0]
    plain, spec = decode_both(with_eos(model, first), [5, 6], DecodeSettings(max_new_tokens=20))
    assert tokens_of(plain) == tokens_of(spec) == [first]
    assert len(spec) == 1 and spec[0].finish_reason == "eos"


def test_prompt_longer_than_context_is_a_clear_error(tiny_base):
    model = SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, 0))
    for decode in (plain_decode, specstream_decode):
        with pytest.raises(ValueError, match="exceeds the model's context of 256 tokens"):
            next(decode(model, [5] * 250, DecodeSettings(max_new_tokens=10)))
        with pytest.raises(ValueError, match="prompt is empty"):
            next(decode(model, [], DecodeSettings(max_new_tokens=10)))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_drafts_past_the_context_end_are_positioned_too(tiny_dir, dtype):
    """A reply that ends at the context's last position drafts nodes (and streams) past it; their
    rotary positions are beyond the model's context but must not fail (float32: the CPU kernels' path)."""
    from specstream.loading import load_base_model

    base = load_base_model(str(tiny_dir), device="cpu", dtype=dtype)
    model = SpeculativeModel(base.weights, random_adapter(base, 0).to(getattr(torch, dtype)))
    prompt = [7, 8, 9, 10] * 62  # 248 tokens of a repeated phrase: long copied branches
    settings = DecodeSettings(max_new_tokens=8, tree="fixed", node_budget=16, lookup_tokens=16, stop_at_eos=False)
    plain, spec = decode_both(model, prompt, settings)
    assert tokens_of(plain) == tokens_of(spec) and len(tokens_of(spec)) == 8
    # No draft can reach past the rotary table's spare positions: a chain of every node, then a copied branch.
    from specstream.decoding import MAX_LOOKUP_TOKENS, MAX_NODE_BUDGET
    from specstream.llama import ROTARY_TABLE_SPARE

    assert MAX_NODE_BUDGET + MAX_LOOKUP_TOKENS + 8 <= ROTARY_TABLE_SPARE


@pytest.mark.parametrize(
    "settings, message",
    [
        (DecodeSettings(max_new_tokens=0), "max new tokens"),
        (DecodeSettings(top_k=()), "top-k"),
        (DecodeSettings(top_k=(4, 0)), "top-k"),
        (DecodeSettings(node_budget=10_000), "node budget"),
        (DecodeSettings(prune_threshold=1.5), "pruning threshold"),
        (DecodeSettings(phrase_mix=-0.1), "phrase and context mix"),
        (DecodeSettings(phrase_mix=0.6, context_mix=0.6), "together at most 1"),
        (DecodeSettings(gamma=9), "gamma must be 1 to 3"),
    ],
)
def test_absurd_settings_are_refused(tiny_base, settings, message):
    model = SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, 0))
    with pytest.raises(SettingsError, match=message):
        next(specstream_decode(model, [5, 6], settings))


def test_pruning_marks_pruned_nodes(tiny_base):
    model = SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, 5))
    settings = DecodeSettings(max_new_tokens=30, top_k=(6, 4, 3), node_budget=60, tree="fixed", prune_threshold=0.2, stop_at_eos=False)
    plain, spec = decode_both(model, [3, 4, 5], settings)
    assert tokens_of(spec) == tokens_of(plain)
    pruned = [n for r in spec[1:] for n in r.nodes if n.fate is Fate.PRUNED]
    assert pruned and all(n.prune_score is not None for n in pruned)
    assert all(n.prune_score < 0.2 or r.nodes[n.parent].fate is Fate.PRUNED for r in spec[1:] for n in r.nodes if n.fate is Fate.PRUNED)


def test_prompt_lookup_branch_is_verified_losslessly(tiny_base):
    """A prompt that holds the model's own earlier reply: the lookup branch proposes its
    continuation, and the tokens the model repeats are accepted from that branch."""
    model = SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, 2))
    free = tokens_of(plain_decode(model, [5, 6, 7], DecodeSettings(max_new_tokens=30, stop_at_eos=False)))
    prompt = [5, 6, 7] + free[:20] + [5, 6, 7]  # the greedy reply to [5, 6, 7] is in the prompt
    settings = DecodeSettings(max_new_tokens=20, top_k=(1,), node_budget=2, tree="fixed", lookup_tokens=8, stop_at_eos=False)
    plain, spec = decode_both(model, prompt, settings)
    assert tokens_of(spec) == tokens_of(plain)
    lookup_accepted = [n for r in spec[1:] for n in r.nodes if n.source == "lookup" and n.fate is Fate.ACCEPTED]
    assert lookup_accepted


@pytest.mark.parametrize("mode", ["deferred", "likely"])
def test_other_stream_passes_draft_what_the_joint_pass_drafts(tiny_base, mode):
    model = SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, 4))
    runs = {}
    for stream_pass in ("joint", mode):
        settings = DecodeSettings(max_new_tokens=30, top_k=(6, 4, 3), node_budget=40, tree="fixed", stream_pass=stream_pass,
                                  stop_at_eos=False)
        runs[stream_pass] = list(specstream_decode(model, [3, 9, 4], settings))
    assert len(runs["joint"]) == len(runs[mode])
    for joint, other in zip(runs["joint"], runs[mode]):
        assert [n.token_id for n in joint.nodes] == [n.token_id for n in other.nodes]
        assert [round(n.draft_prob, 9) for n in joint.nodes] == [round(n.draft_prob, 9) for n in other.nodes]
        assert joint.emitted_tokens == other.emitted_tokens
    assert any(r.accepted_length for r in runs["joint"][1:])


def test_draft_vocabulary_limits_drafts_not_outputs(tiny_base):
    adapter = random_adapter(tiny_base, 5, draft_vocab_size=12)
    allowed = [2] + list(range(9, 20))
    adapter.draft_vocab.copy_(torch.tensor(allowed))
    model = SpeculativeModel(tiny_base.weights, adapter)
    plain, spec = decode_both(model, [5, 9, 11], replace(WIDE, context_mix=0.0))
    assert tokens_of(spec) == tokens_of(plain)
    drafted = {n.token_id for r in spec for n in r.nodes if n.source == "stream"}
    assert drafted and drafted <= set(allowed)
    # The text's own next-token shares may rank in tokens the streams cannot draft: only the text's.
    shared = list(specstream_decode(model, [5, 9, 11], WIDE))
    assert tokens_of(shared) == tokens_of(plain)
    drafted = {n.token_id for r in shared for n in r.nodes if n.source == "stream"}
    assert drafted <= set(allowed) | {5, 9, 11, *tokens_of(plain)}
    full = SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, 5))  # same weights, whole vocabulary
    assert {n.token_id for r in specstream_decode(full, [5, 9, 11], WIDE) for n in r.nodes} - set(allowed)


def test_phrase_table_branch_is_verified_losslessly(tiny_base):
    """A phrase table that knows the model's own reply: its chain is drafted where prompt lookup
    has nothing longer, the tokens the model repeats are accepted from it, and output stays plain's."""
    model = SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, 2))
    reply = tokens_of(plain_decode(model, [5, 6, 7], DecodeSettings(max_new_tokens=30, stop_at_eos=False)))
    model.phrases = PhraseTable.build([reply, reply], min_count=2)
    settings = DecodeSettings(max_new_tokens=24, top_k=(1,), node_budget=2, tree="fixed", lookup_tokens=8, stop_at_eos=False)
    plain, spec = decode_both(model, [5, 6, 7], settings)
    assert tokens_of(spec) == tokens_of(plain)
    phrase_accepted = [n for r in spec[1:] for n in r.nodes if n.source == "phrase" and n.fate is Fate.ACCEPTED]
    assert len(phrase_accepted) >= 8
    assert sum(len(r.emitted_tokens) for r in spec[1:]) / (len(spec) - 1) > 2  # copied runs are long
    off = list(specstream_decode(model, [5, 6, 7], replace(settings, phrases=False)))
    assert tokens_of(off) == tokens_of(plain) and not any(n.source == "phrase" for r in off for n in r.nodes)


def test_phrase_shares_rank_stream_drafts_losslessly(tiny_base):
    """A phrase table that knows the model's reply reorders the streams' candidates toward it: more
    stream drafts are accepted than with the streams alone, and the output stays plain's."""
    model = SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, 2))
    reply = tokens_of(plain_decode(model, [5, 6, 7], DecodeSettings(max_new_tokens=30, stop_at_eos=False)))
    model.phrases = PhraseTable.build([reply, reply], min_count=2)
    settings = DecodeSettings(max_new_tokens=24, top_k=(8, 8, 8), node_budget=4, tree="fixed", lookup_tokens=0,
                              stop_at_eos=False)
    plain, mixed = decode_both(model, [5, 6, 7], settings)
    alone = list(specstream_decode(model, [5, 6, 7], replace(settings, phrase_mix=0.0)))
    assert tokens_of(mixed) == tokens_of(plain) == tokens_of(alone)

    def accepted(records):
        return sum(n.source == "stream" and n.fate is Fate.ACCEPTED for r in records[1:] for n in r.nodes)
    assert accepted(mixed) > accepted(alone) + 5


def test_context_shares_rank_stream_drafts_losslessly(tiny_base, monkeypatch):
    """The tiny random model repeats itself: the text's own next-token shares rank the streams'
    candidates toward what it said before, so more stream drafts are accepted than with the streams
    alone (25 against 7 here), and the output stays plain's. Trees below CONTEXT_MIN_NODES ignore them."""
    model = SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, 2))
    small = DecodeSettings(max_new_tokens=20, top_k=(8, 8, 8), node_budget=4, tree="fixed", stop_at_eos=False)
    assert [r.nodes for r in specstream_decode(model, [5, 6, 7], small)] == [
        r.nodes for r in specstream_decode(model, [5, 6, 7], replace(small, context_mix=0.0))]
    monkeypatch.setattr(decoding, "CONTEXT_MIN_NODES", 1)
    settings = DecodeSettings(max_new_tokens=40, top_k=(8, 8, 8), node_budget=4, tree="fixed", lookup_tokens=0,
                              phrase_mix=0.0, stop_at_eos=False)

    def accepted(records):
        return sum(n.source == "stream" and n.fate is Fate.ACCEPTED for r in records[1:] for n in r.nodes)
    mixed_total = alone_total = 0
    for prompt in ([5, 6, 7], [9, 11], [3, 4, 5, 6]):
        plain, mixed = decode_both(model, prompt, settings)
        alone = list(specstream_decode(model, prompt, replace(settings, context_mix=0.0)))
        assert tokens_of(mixed) == tokens_of(plain) == tokens_of(alone)
        mixed_total, alone_total = mixed_total + accepted(mixed), alone_total + accepted(alone)
    assert mixed_total > 2 * alone_total and mixed_total >= alone_total + 10


def test_auto_stream_pass_is_likely_on_a_cpu_and_joint_on_a_gpu():
    """A GPU computes a joint pass's stream rows for next to nothing, and a second pass costs launches."""
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert DecodeSettings().likely_streams(cpu) and not DecodeSettings().likely_streams(gpu)
    assert DecodeSettings(stream_pass="likely").likely_streams(gpu)
    assert not DecodeSettings(stream_pass="joint").likely_streams(cpu)
