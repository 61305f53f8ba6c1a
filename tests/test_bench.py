"""The benchmark's command-line contract, on the tiny model."""

import json

import pytest

from specstream import ablation, bench
from specstream.adapter import save_adapter
from specstream.costs import measure_afresh

from .conftest import random_adapter

PROMPTS = [
    {"question_id": 1, "category": "writing", "turns": ["w3 w4 w5", "second turn is ignored"]},
    {"question_id": 2, "category": "coding", "turns": ["w6 w7"]},
    {"question_id": 3, "category": "coding", "turns": ["w8"]},
]


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def test_bench_json_contract(tiny_dir, tiny_base, prompt_file, tmp_path, monkeypatch):
    afresh = []
    monkeypatch.setattr(bench, "measure_afresh", lambda model: afresh.append(model) or measure_afresh(model))
    adapter = save_adapter(random_adapter(tiny_base, 0), tmp_path / "adapter")
    out = tmp_path / "out.json"
    argv = ["--prompts", str(prompt_file), "--limit", "2", "--max-new-tokens", "12", "--methods",
            "plain,specstream,hf_generate", "--json", str(out), "--adapter", str(adapter), "--model", str(tiny_dir),
            "--device", "cpu", "--dtype", "float64", "--quiet", "--report", str(tmp_path / "report")]
    bench.main(argv)
    result = json.loads(out.read_text())
    for key in ("model", "device", "dtype", "prompts", "methods", "speedup_vs_plain", "identical_outputs", "divergences"):
        assert key in result
    assert result["prompts"] == 2 and result["device"] == "cpu" and result["dtype"] == "float64"
    for method in ("plain", "specstream", "hf_generate"):
        stats = result["methods"][method]
        assert {"tokens", "seconds", "tokens_per_s", "forward_passes", "mean_accepted"} <= set(stats)
        assert stats["tokens"] > 0
    assert result["methods"]["plain"]["mean_accepted"] == 1.0
    by_source = result["methods"]["specstream"]["accepted_per_pass_by_source"]
    assert set(by_source) <= {"stream", "lookup", "phrase"} and not result["methods"]["plain"]["accepted_per_pass_by_source"]
    assert sum(by_source.values()) <= result["methods"]["specstream"]["mean_accepted"]
    assert result["identical_outputs"] == 2, result["divergences"]
    assert set(result["per_category"]) == {"writing", "coding"}
    costs = result["pass_costs"]  # what the auto tree planned with, measured by this run
    assert len(afresh) == 1
    assert costs["source"] == "measured by this run" and costs["plain_step_ms"] > 0
    assert sorted(costs["tree_ms"]) == ["1", "2", "3"] and all(ms > 0 for ms in costs["tree_ms"]["3"].values())
    table = (tmp_path / "report" / "results.md").read_text()
    assert [line.split("|")[1].strip() for line in table.splitlines()[2:5]] == ["coding", "writing", "**all**"]
    assert "hf_generate tok/s" in table and "identical outputs: 2 of 2" in table
    assert (tmp_path / "report" / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_category_filter_and_errors(tiny_dir, prompt_file, tmp_path):
    def argv(methods="plain", adapter="fresh"):
        return ["--prompts", str(prompt_file), "--category", "coding", "--max-new-tokens", "4", "--methods", methods,
                "--model", str(tiny_dir), "--device", "cpu", "--quiet", "--adapter", adapter]

    assert bench.main(argv())["prompts"] == 2
    with pytest.raises(SystemExit, match="unknown methods"):
        bench.main(argv(methods="magic"))
    with pytest.raises(SystemExit, match="adapter folder .* does not exist"):
        bench.main(argv(adapter=str(tmp_path / "missing")))


def test_ablation_rows_are_lossless_variants(tiny_dir, tiny_base, prompt_file, tmp_path):
    adapter = save_adapter(random_adapter(tiny_base, 0), tmp_path / "adapter")
    argv = ["--prompts", str(prompt_file), "--per-category", "1", "--max-new-tokens", "10", "--adapter", str(adapter),
            "--model", str(tiny_dir), "--device", "cpu", "--dtype", "float64", "--quiet",
            "--json", str(tmp_path / "ablation.json"), "--markdown", str(tmp_path / "ablation.md")]
    ablation.main(argv)
    result = json.loads((tmp_path / "ablation.json").read_text())
    assert result["prompts"] == 2  # one writing, one coding prompt
    rows = {r["setting"]: r for r in result["rows"]}
    assert list(rows) == list(ablation.VARIANTS)
    assert rows["plain"]["tau"] == 1.0 and rows["plain"]["speedup_vs_plain"] == 1.0
    assert all(r["identical"] == 2 for r in rows.values()), rows
    table = (tmp_path / "ablation.md").read_text().splitlines()
    assert len(table) == 2 + len(ablation.VARIANTS) and table[2].startswith("| plain | 1.00 |")


def test_methods_take_turns_on_each_prompt():
    calls = []
    runs = {name: (lambda ids, name=name: calls.append((name, ids[0])) or bench.Outcome([ids[0]], 0.1, 1))
            for name in ("plain", "specstream", "hf_generate")}
    outcomes = bench.run_interleaved(runs, [[10], [11], [12]], quiet=True)
    # Each prompt is finished by every method before the next starts, and the first method rotates.
    assert [prompt for _, prompt in calls] == [10, 10, 10, 11, 11, 11, 12, 12, 12]
    assert [calls[i][0] for i in (0, 3, 6)] == ["plain", "specstream", "hf_generate"]
    assert {name: [o.tokens[0] for o in runs_] for name, runs_ in outcomes.items()} == {
        name: [10, 11, 12] for name in runs}


def test_a_stop_request_ends_the_run_between_prompts():
    calls = []
    runs = {name: (lambda ids, name=name: calls.append(ids[0]) or bench.Outcome([ids[0]], 0.1, 1))
            for name in ("plain", "specstream")}
    asked = []
    stop = lambda: asked.append(len(calls)) or ("time limit" if len(calls) >= 4 else None)  # noqa: E731
    outcomes = bench.run_interleaved(runs, [[10], [11], [12], [13]], quiet=True, stop=stop)
    # Asked before each prompt after the first; both methods finish the prompt under way.
    assert asked == [2, 4] and calls == [10, 10, 11, 11]
    assert {name: len(o) for name, o in outcomes.items()} == {"plain": 2, "specstream": 2}
    always = bench.run_interleaved(runs, [[20], [21]], quiet=True, stop=lambda: "at once")
    assert {name: len(o) for name, o in always.items()} == {"plain": 1, "specstream": 1}  # something to report


def test_sigterm_asks_to_stop_instead_of_killing():
    import os
    import signal

    before, before_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with bench.StopRequest() as stop:
        assert stop() is None
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (main) thread before kill() returns
        assert stop() == "SIGTERM received"
        assert signal.getsignal(signal.SIGTERM) is before  # a second one acts as usual
    assert signal.getsignal(signal.SIGTERM) is before and signal.getsignal(signal.SIGINT) is before_int


def test_an_ignored_signal_stays_ignored():
    # A job started in the background of a script has SIGINT ignored; the bench must not take it up.
    import signal

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with bench.StopRequest():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def test_bench_time_limit_reports_the_prompts_run(tiny_dir, prompt_file, tmp_path):
    out = tmp_path / "out.json"
    bench.main(["--prompts", str(prompt_file), "--max-new-tokens", "4", "--methods", "plain,specstream",
                "--model", str(tiny_dir), "--device", "cpu", "--quiet", "--adapter", "fresh",
                "--time-limit", "1e-9", "--json", str(out), "--report", str(tmp_path / "report")])
    result = json.loads(out.read_text())
    assert (result["prompts"], result["prompts_requested"], result["stopped_early"]) == (1, 3, "time limit")
    assert result["methods"]["plain"]["tokens"] == 4 and result["identical_outputs"] == 1
    assert "Stopped early (time limit) after 1 of 3 prompts." in (tmp_path / "report" / "results.md").read_text()
