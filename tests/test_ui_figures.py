"""The app's figures, highlighting and texts as pure functions of step records, on the tiny model."""

import dataclasses
import html
import json
import re

import gradio as gr
import pytest

from specstream.decoding import DecodeSettings, plain_decode
from specstream.phrases import PhraseTable
from specstream.streams import SpeculativeModel, stream_attention_mask
from specstream.tree import Fate, tree_attention_mask
from specstream.ui import figures, views
from specstream.ui.handlers import make_settings
from specstream.ui.highlight import END_MARK, plain_html, reply_text, specstream_html, token_roles, visible
from specstream.ui.race import race

from .conftest import random_adapter

SETTINGS = DecodeSettings(max_new_tokens=40, top_k=(6, 4, 3), node_budget=40, tree="fixed", prune_threshold=0.03, stop_at_eos=False)


@pytest.fixture(scope="module")
def trace(tiny_base):
    model = SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, 7))
    ids = tiny_base.chat_prompt("w3 w4 w5")
    *_, last = race(model, "w3 w4 w5", ids, SETTINGS, tiny_base.token_text)
    return last


def test_race_is_complete_and_lossless(trace):
    assert trace.finished and trace.plain.tokens == trace.specstream.tokens
    assert len(trace.plain.tokens) == SETTINGS.max_new_tokens
    assert trace.plain.clock == pytest.approx(sum(r.seconds for r in trace.plain.records))
    assert trace.specstream.stats().forward_passes < trace.plain.stats().forward_passes
    assert trace.divergence() is None and "Identical replies (40 tokens)" in views.verdict_markdown(trace)


def test_divergence_is_found_from_token_ids(trace):
    records = list(trace.specstream.records)
    changed = dataclasses.replace(records[2], emitted_tokens=(999,) + records[2].emitted_tokens[1:],
                                  emitted_texts=("XX",) + records[2].emitted_texts[1:])
    records[2] = changed
    bad = dataclasses.replace(trace, specstream=dataclasses.replace(trace.specstream, records=records))
    position = sum(len(r.emitted_tokens) for r in records[:2])
    assert bad.divergence().position == position and bad.divergence().specstream_text == "XX"
    assert f"differ from token {position + 1}" in views.verdict_markdown(bad)


def test_tree_figure_shows_every_node_by_fate(trace):
    record = next(r for r in trace.steps() if r.accepted_length and any(n.fate is Fate.PRUNED for n in r.nodes))
    fig = figures.tree_figure(record)
    markers = {t.name: t for t in fig.data if t.mode == "markers+text"}
    for fate in Fate:
        expected = [n for n in record.nodes if n.fate is fate]
        assert len(markers[fate.value].x) == len(expected)
        assert markers[fate.value].marker.color == figures.FATE_COLOURS[fate]
    path = next(t for t in fig.data if t.name == "accepted path")
    assert len([x for x in path.x if x is not None]) == 2 * record.accepted_length
    node = record.nodes[record.accepted_path[1]]
    hover = " ".join(markers["accepted"].hovertext)
    assert f"draft p={node.draft_prob:.3f}" in hover and f"stream {node.stream}" in hover
    assert "pruning score" in hover
    rejected = [n for n in record.nodes if n.fate is Fate.REJECTED]
    if rejected:  # a rejected draft says what the model wanted in its place: its parent's choice
        wanted = record.nodes[rejected[0].parent].main_choice_text
        assert f"the model wanted: {visible(wanted)}" in markers["rejected"].hovertext[0]


def test_tree_positions_centre_parents_on_children(trace):
    record = trace.steps()[1]
    positions = figures.tree_positions(record.nodes)
    for node in record.nodes:
        assert positions[node.index][0] == node.depth
        kids = [n.index for n in record.nodes if n.parent == node.index]
        if kids:
            assert positions[node.index][1] == pytest.approx(sum(positions[k][1] for k in kids) / len(kids))


def test_race_figure_follows_each_clock(trace):
    fig = figures.race_figure(trace)
    for line, side in zip(fig.data, (trace.plain, trace.specstream)):
        assert line.name == side.method
        assert line.y[-1] == len(side.tokens) and line.x[-1] == pytest.approx(side.clock)


def test_acceptance_and_step_charts(trace):
    steps = trace.steps()[1:]
    depth_one = sum(r.accepted_length >= 1 for r in steps) / len(steps)
    assert figures.acceptance_by_depth_figure(trace).data[0].y[0] == pytest.approx(depth_one)
    assert list(figures.accepted_per_step_figure(trace).data[0].y) == [r.accepted_length for r in steps]
    times = figures.pass_time_figure(trace).data
    assert len(times[0].y) == len(trace.plain.records) - 1 and len(times[1].y) == len(steps)


def test_attention_mask_figure_is_the_pass_mask(trace):
    record = next(r for r in trace.steps() if any(n.fate is Fate.PRUNED for n in r.nodes))
    kept = [n for n in record.nodes if n.fate is not Fate.PRUNED]
    row = {n.index: i for i, n in enumerate(kept)}
    sources = [row[n] for n in record.stream_nodes]
    assert record.stream_nodes and set(record.stream_nodes) <= set(row)
    expected = stream_attention_mask(tree_attention_mask([row.get(n.parent, -1) for n in kept]), sources, record.stream_depth)
    z = figures.attention_mask_figure(record, trace.depth).data[0].z
    assert len(z) == len(kept) + len(sources) * record.stream_depth
    assert [[bool(v) for v in line] for line in z] == expected.tolist()


def test_attention_mask_shows_only_the_streams_a_pass_computed(tiny_base):
    """With streams only where the path is likely to end, the mask has no rows for the others."""
    model = SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, 7))
    settings = dataclasses.replace(SETTINGS, prune_threshold=0.0, stream_pass="likely")
    *_, last = race(model, "w3 w4 w5", tiny_base.chat_prompt("w3 w4 w5"), settings, tiny_base.token_text)
    record = next(r for r in last.steps() if 0 < len(r.stream_nodes) < len(r.nodes))
    z = figures.attention_mask_figure(record, last.depth).data[0].z
    assert len(z) == len(record.nodes) + len(record.stream_nodes) * record.stream_depth
    labels = figures.mask_labels(record, record.stream_depth)
    assert sum(label.startswith("S1·") for label in labels) == len(record.stream_nodes)
    where = "the root only" if len(record.stream_nodes) == 1 else f"{len(record.stream_nodes)} of its nodes"
    assert f"streams at {where}" in views.step_markdown(record, 10)
    second = next(r for r in last.steps() if r.second_pass)
    assert "a short second pass computed the deepest accepted node's streams" in views.step_markdown(second, 10)


def test_highlight_bands_come_from_token_ids(trace):
    steps = trace.steps()
    page = specstream_html(steps, selected_step=3)
    spans = re.findall(r'<span class="([^"]*)" data-step="(\d+)" title="([^"]*)"[^>]*>([^<]*)</span>', page)
    assert [int(s) for _, s, _, _ in spans] == [r.step for r in steps for _ in r.emitted_tokens]
    assert "".join(html.unescape(text) for *_, text in spans) == "".join(trace.specstream.texts)
    # every tree pass ends with its bonus, unless the token limit cut it inside the accepted path
    with_bonus = sum(len(r.emitted_tokens) > r.accepted_length for r in steps[1:])
    assert sum("ss-bonus" in c for c, *_ in spans) == with_bonus >= len(steps) - 2
    assert {int(s) for c, s, _, _ in spans if "ss-selected" in c} == {3}
    record = next(r for r in steps if r.accepted_length and r.nodes[r.accepted_path[1]].source == "stream")
    prob = token_roles(record)[0][1]
    assert prob == record.nodes[record.accepted_path[1]].draft_prob
    assert any(f"step {record.step} " in html.unescape(t) and f"p={prob:.2f}" in t for _, _, t, _ in spans)
    assert "&lt;|" in page or "<|" not in "".join(trace.specstream.texts)  # token text is escaped
    assert html.unescape(re.sub("<[^>]+>", "", plain_html(trace.plain.records))) == "".join(trace.plain.texts)


def test_end_of_sequence_is_a_mark_not_control_text(trace):
    steps = trace.steps()
    last = steps[-1]
    ended = dataclasses.replace(last, emitted_texts=last.emitted_texts[:-1] + ("<|im_end|>",), finish_reason="eos")
    records = steps[:-1] + [ended]
    for page in (specstream_html(records), plain_html(records)):
        assert "im_end" not in page and page.count(f">{END_MARK}<") == 1 and "ss-end" in page
    assert reply_text(records) == "".join(trace.specstream.texts[:-1])  # the API's text has no control token


@pytest.mark.parametrize(
    "values, message",
    [
        ((64, 3, "4, x", 24, 0.0), "whole numbers"),
        ((64, 3, "", 24, 0.0), "at least one"),
        ((10_000, 3, "4", 24, 0.0), "at most 512"),
        ((64, 3, "4", 0, 0.0), "node budget"),
        ((64, 3, "4", 24, 1.5), "pruning threshold"),
        ((64, "three", "4", 24, 0.0), "must be a number"),
    ],
)
def test_absurd_settings_are_sentences(values, message):
    with pytest.raises(gr.Error, match=message):
        make_settings(*values)


def assert_nodes_marked(trace, source: str, symbol: str, words: str) -> None:
    """The first step that drafted from `source` draws exactly those nodes as `symbol` and names the source on hover."""
    record = next(r for r in trace.steps() if any(n.source == source for n in r.nodes))
    fig = figures.tree_figure(record)
    marked = sum(s == symbol for t in fig.data if t.mode == "markers+text" for s in t.marker.symbol)
    assert marked == sum(n.source == source for n in record.nodes)
    assert any(words in h for t in fig.data if t.mode == "markers+text" for h in t.hovertext)


def test_prompt_lookup_nodes_are_marked(tiny_base):
    model = SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, 3))
    prompt = "w3 w4 w5 w6 w3 w4 w5 w6 w3 w4"
    settings = DecodeSettings(max_new_tokens=20, lookup_tokens=4, stop_at_eos=False)
    *_, trace = race(model, prompt, tiny_base.chat_prompt(prompt), settings, tiny_base.token_text)
    assert_nodes_marked(trace, "lookup", "diamond", "prompt lookup")
    record = next(r for r in trace.steps() if any(n.source == "lookup" for n in r.nodes))
    assert record.copied_source == "lookup" and 1 <= record.copied_key <= settings.lookup_ngram
    hovers = [h for t in figures.tree_figure(record).data if t.mode == "markers+text" for h in t.hovertext]
    assert any(f"found by the text's last {record.copied_key} token" in h for h in hovers)


def test_phrase_table_nodes_are_marked(tiny_base):
    model = SpeculativeModel(tiny_base.weights, random_adapter(tiny_base, 3))
    prompt = "w3 w4 w5"
    reply = [t for r in plain_decode(model, tiny_base.chat_prompt(prompt), DecodeSettings(max_new_tokens=20, stop_at_eos=False))
             for t in r.emitted_tokens]
    model.phrases = PhraseTable.build([reply, reply])
    settings = DecodeSettings(max_new_tokens=20, lookup_tokens=4, stop_at_eos=False)
    *_, trace = race(model, prompt, tiny_base.chat_prompt(prompt), settings, tiny_base.token_text)
    assert_nodes_marked(trace, "phrase", "square", "phrase table")
    accepted = [role for r in trace.steps() for role, *_ in token_roles(r) if "phrase table" in role]
    assert accepted  # the highlighted reply says which tokens the phrase table drafted


def test_trace_file_holds_the_whole_run(trace):
    data = json.loads(open(views.write_trace_file(trace, {"model": "tiny"})).read())
    assert data["plain_text"] == data["specstream_text"] == "".join(trace.plain.texts)
    assert len(data["steps"]) == len(trace.steps()) and len(data["plain_steps"]) == len(trace.plain.records)
    assert data["model"] == {"model": "tiny"} and data["identical"] is True


@pytest.mark.parametrize("dtype, warned", [("float32", False), ("float64", False), ("bfloat16", True), ("float16", True)])
def test_model_line_says_when_16_bit_logits_can_part_the_columns(dtype, warned):
    info = {"status": "ready", "model": "m", "weights": "m", "device": "cuda:0", "dtype": dtype, "matmul": "torch",
            "adapter_mode": "lossless", "gamma": 3, "stream_layers": 6, "adapter_note": ""}
    text = views.model_markdown(info)
    assert "must show the same text" in text
    assert ("up to logit ties" in text) is warned


def test_the_app_defaults_to_float32_everywhere(monkeypatch):
    from specstream.ui.service import ModelChoice

    monkeypatch.delenv("SPECSTREAM_DTYPE", raising=False)
    assert ModelChoice.from_environment().dtype == ModelChoice().dtype == "float32"
