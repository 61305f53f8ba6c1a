"""The benchmark: plain decoding, Speculative Streaming and transformers' own decoders on the same
model, device, dtype and prompts, greedy, with a warm-up first. Methods take turns on each prompt (their
order rotating from prompt to prompt), so a shared machine's drift in speed over a long run falls on
every method alike instead of on whichever ran last.

    python -m specstream.bench --prompts FILE.jsonl --limit N --max-new-tokens M \\
        --methods plain,specstream,hf_generate --json OUT.json [--adapter PATH] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from .adapter import AdapterError
from .decoding import DECODERS, STREAM_PASSES, DecodeSettings, SettingsError, planning_costs
from .engine import build_model, default_adapter_path
from .costs import cpu_name, measure_afresh
from .report import write_report
from .llama import attention_backends, masked_attention_way
from .loading import BaseModel, ModelLoadError, load_base_model, load_reference_model
from .streams import SpeculativeModel

METHODS = ("plain", "specstream", "hf_generate", "hf_prompt_lookup")
WARMUP_TOKENS = 8


@dataclass(frozen=True)
class Prompt:
    question_id: str
    category: str
    text: str


@dataclass
class Outcome:
    tokens: list[int]
    seconds: float
    forward_passes: int
    accepted_by_source: dict[str, int] = field(default_factory=dict)  # accepted drafts: stream, lookup, phrase


def read_prompts(path: Path, limit: int | None, category: str | None) -> list[Prompt]:
    prompts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            prompt = Prompt(str(record["question_id"]), record.get("category", "unknown"), record["turns"][0])
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise SystemExit(f"{path}:{number} is not a Spec-Bench record (question_id, category, turns)") from None
        if category is None or prompt.category == category:
            prompts.append(prompt)
    return prompts[:limit] if limit else prompts


class Runner:
    """Runs one method on one prompt and times it, wall clock, after a device sync."""

    def __init__(self, base: BaseModel, model: SpeculativeModel, settings: DecodeSettings):
        self.base, self.model, self.settings = base, model, settings
        self._reference = None

    @property
    def reference(self):
        if self._reference is None:
            self._reference = load_reference_model(self.base)
        return self._reference

    def run(self, method: str, prompt_ids: list[int], max_new_tokens: int) -> Outcome:
        settings = DecodeSettings(**(asdict(self.settings) | {"max_new_tokens": max_new_tokens}))
        self._sync()
        started = time.perf_counter()
        records = []
        if method in DECODERS:
            records = list(DECODERS[method](self.model, prompt_ids, settings))
            tokens = [t for r in records for t in r.emitted_tokens]
            passes = records[-1].forward_passes
        else:
            tokens, passes = self._run_transformers(method, prompt_ids, max_new_tokens)
        self._sync()
        seconds = time.perf_counter() - started
        sources = Counter(r.nodes[i].source for r in records for i in r.accepted_path[1:])
        return Outcome(tokens, seconds, passes, dict(sources))

    def _run_transformers(self, method: str, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], int]:
        passes = 0

        def count(*_):
            nonlocal passes
            passes += 1

        hook = self.reference.register_forward_pre_hook(count)
        options = {"prompt_lookup_num_tokens": 10} if method == "hf_prompt_lookup" else {}
        eos = list(self.model.shape.eos_token_ids)
        try:
            # The attention kernels our passes use, so that a GPU's cuDNN set-up per new shape slows
            # neither side (the H200 run of 2026-11-26 gave transformers torch's own choice).
            with torch.inference_mode(), attention_backends(self.base.device):
                output = self.reference.generate(
                    torch.tensor([prompt_ids], device=self.base.device),
                    attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=self.base.device),
                    max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos or None,
                    pad_token_id=eos[0] if eos else None, **options,
                )
        finally:
            hook.remove()
        return output[0, len(prompt_ids) :].tolist(), passes

    def _sync(self) -> None:
        if self.base.device.type == "cuda":
            torch.cuda.synchronize()


def first_divergence(runner: Runner, prompt_ids: list[int], reference: list[int], other: list[int]) -> dict | None:
    """Where `other` first leaves the plain output, with the logit gap between the two tokens
    under our plain forward and under transformers' model: a near-tie shows as a tiny gap."""
    position = next((i for i, (a, b) in enumerate(zip(reference, other)) if a != b), None)
    if position is None:
        if len(reference) == len(other):
            return None
        position = min(len(reference), len(other))
        return {"position": position, "note": "one output is a prefix of the other"}
    context = torch.tensor([prompt_ids + reference[:position]], device=runner.base.device)
    ours = _our_logits(runner.model, context[0])
    with torch.inference_mode():
        theirs = runner.reference(context).logits[0, -1].float()
    a, b = reference[position], other[position]
    return {
        "position": position,
        "plain_token": a,
        "other_token": b,
        "plain_logit_gap": float(ours[a] - ours[b]),
        "transformers_logit_gap": float(theirs[a] - theirs[b]),
    }


def _our_logits(model: SpeculativeModel, tokens: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        cache = model.new_cache(len(tokens))
        causal = torch.ones(len(tokens), len(tokens), dtype=torch.bool, device=tokens.device).tril()
        out = model.forward(cache, tokens, torch.arange(len(tokens), device=tokens.device), causal)
        return model.logits(out.main_hidden[-1]).float()


def summarise(outcomes: dict[str, list[Outcome]]) -> dict:
    summary = {}
    for method, runs in outcomes.items():
        tokens = sum(len(o.tokens) for o in runs)
        seconds = sum(o.seconds for o in runs)
        passes = sum(o.forward_passes for o in runs)
        summary[method] = {
            "tokens": tokens,
            "seconds": round(seconds, 4),
            "tokens_per_s": round(tokens / seconds, 3) if seconds else 0.0,
            "forward_passes": passes,
            "mean_accepted": round(tokens / passes, 4) if passes else 0.0,
            "median_seconds_per_prompt": round(statistics.median(o.seconds for o in runs), 4),
            # What each draft source added: accepted drafts per forward pass (tau = 1 + their sum).
            "accepted_per_pass_by_source": {
                source: round(sum(o.accepted_by_source.get(source, 0) for o in runs) / passes, 4)
                for source in sorted({s for o in runs for s in o.accepted_by_source})
            } if passes else {},
        }
    return summary


def speedups(summary: dict, over: str) -> dict:
    if over not in summary:
        return {}
    return {m: round(s["tokens_per_s"] / summary[over]["tokens_per_s"], 3) for m, s in summary.items() if m != over}


def machine_info(base: BaseModel) -> dict:
    import transformers

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads(), "matmul": base.weights.matmul}
    if base.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(base.device)
        info["masked_attention"] = masked_attention_way(base.device)  # key and value heads repeated or grouped
    return info


def benchmark(args: argparse.Namespace) -> dict:
    started = time.monotonic()  # the time limit covers loading, cost tables and warm-up too
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    prompts = read_prompts(args.prompts, args.limit, args.category)
    if not prompts:
        raise SystemExit(f"no prompts in {args.prompts}" + (f" of category {args.category}" if args.category else ""))
    base = load_base_model(args.model, device=args.device, dtype=args.dtype)
    adapter = args.adapter or "default"
    model = build_model(base, adapter)
    settings = DecodeSettings(
        top_k=tuple(int(k) for k in args.top_k.split(",")), node_budget=args.node_budget,
        prune_threshold=args.prune_threshold, gamma=args.gamma, tree=args.tree, lookup_tokens=args.lookup_tokens,
        stream_pass=args.stream_pass, phrase_mix=args.phrase_mix, context_mix=args.context_mix,
    ).validate(model)
    if not args.kept_costs:
        measure_afresh(model)
    runner = Runner(base, model, settings)
    prompt_ids = [base.chat_prompt(p.text) for p in prompts]
    for method in methods:  # warm-up: first-call allocations and kernel selection
        runner.run(method, prompt_ids[0], WARMUP_TOKENS)
    runs = {m: (lambda ids, m=m: runner.run(m, ids, args.max_new_tokens)) for m in methods}
    with StopRequest(args.time_limit, since=started) as stop:
        outcomes = run_interleaved(runs, prompt_ids, quiet=args.quiet, stop=stop)
    done = len(outcomes[methods[0]])
    result = report(args, base, model, runner, methods, prompts[:done], prompt_ids[:done], outcomes)
    return result | {"prompts_requested": len(prompts), "stopped_early": stop.reason}


class StopRequest:
    """Why to start no further prompt: a time limit passed, or SIGTERM / Ctrl-C arrived. The prompt under
    way still finishes, so every method has run on the same prompts and the report of them stays paired;
    a long run cut short (`timeout`, a lease ending, a key pressed) keeps what it measured. A second
    signal stops at once."""

    def __init__(self, seconds: float = 0.0, since: float | None = None):
        since = time.monotonic() if since is None else since
        self.deadline = since + seconds if seconds > 0 else None
        self.reason: str | None = None
        self._previous: dict[int, object] = {}

    def __call__(self) -> str | None:
        if self.reason is None and self.deadline is not None and time.monotonic() > self.deadline:
            self.reason = "time limit"
        return self.reason

    def _on_signal(self, number, frame) -> None:
        self.reason = f"{signal.Signals(number).name} received"
        signal.signal(number, self._previous[number])  # a second one acts as usual
        print(f"\n{self.reason}: finishing the prompt under way, then reporting", file=sys.stderr)

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for number in (signal.SIGTERM, signal.SIGINT):
                if signal.getsignal(number) is not signal.SIG_IGN:  # a background job's Ctrl-C stays ignored
                    self._previous[number] = signal.signal(number, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def run_interleaved(runs: dict[str, Callable[[list[int]], Outcome]], prompt_ids: list[list[int]],
                    quiet: bool = False, stop: Callable[[], str | None] = lambda: None) -> dict[str, list[Outcome]]:
    """Every run on prompt 1, then on prompt 2, ...; the first one rotates so none always runs right
    after another's caches and allocations. Once `stop()` gives a reason no further prompt starts (the
    first always runs, so there is something to report)."""
    names = list(runs)
    outcomes: dict[str, list[Outcome]] = {name: [] for name in names}
    for i, ids in enumerate(tqdm(prompt_ids, desc="prompts", file=sys.stderr, disable=quiet)):
        if i and stop():
            break
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            outcomes[name].append(runs[name](ids))
    return outcomes


def pass_cost_tables(model, settings: DecodeSettings, kept: bool) -> dict:
    """The pass costs the auto tree planned with (ms by tree size, per stream depth), so that a run's
    tree choices can be explained afterwards."""
    tables = planning_costs(model, settings, settings.depth(model))
    return {"source": "kept on disk by an earlier process" if kept else "measured by this run",
            "plain_step_ms": round(tables[1].plain * 1000, 2),
            "tree_ms": {str(d): {str(n): round(t * 1000, 2) for n, t in table.tree.items()} for d, table in tables.items()}}


def report(args, base, model, runner, methods, prompts, prompt_ids, outcomes) -> dict:
    identical, divergences = 0, []
    for i, prompt in enumerate(prompts):
        outputs = {m: outcomes[m][i].tokens for m in methods}
        reference_method = "plain" if "plain" in methods else methods[0]
        same = all(o == outputs[reference_method] for o in outputs.values())
        identical += same
        for method in methods:
            if not same and outputs[method] != outputs[reference_method]:
                found = first_divergence(runner, prompt_ids[i], outputs[reference_method], outputs[method])
                divergences.append({"question_id": prompt.question_id, "method": method, "versus": reference_method} | found)
    summary = summarise(outcomes)
    categories = sorted({p.category for p in prompts})
    per_category = {}
    for category in categories:
        rows = [i for i, p in enumerate(prompts) if p.category == category]
        part = summarise({m: [outcomes[m][i] for i in rows] for m in methods})
        per_category[category] = {"prompts": len(rows), "methods": part, "speedup_vs_plain": speedups(part, "plain")}
    adapter_path = args.adapter or default_adapter_path(base)
    return {
        "model": base.name,
        "model_description": base.description,
        "device": str(base.device),
        "dtype": str(base.dtype).replace("torch.", ""),
        "adapter": str(adapter_path) if adapter_path else "fresh (untrained)",
        "adapter_mode": model.adapter.config.mode if model.adapter else None,
        "settings": asdict(runner.settings) | {"max_new_tokens": args.max_new_tokens},
        # only where the auto tree planned with them: a fixed tree's run would measure them here, unused
        "pass_costs": pass_cost_tables(model, runner.settings, args.kept_costs)
        if "specstream" in methods and runner.settings.tree == "auto" else None,
        "prompts": len(prompts),
        "prompt_file": str(args.prompts),
        "schedule": "interleaved: every method on each prompt in turn, first method rotating",
        "methods": summary,
        "speedup_vs_plain": summary["specstream"]["tokens_per_s"] / summary["plain"]["tokens_per_s"]
        if {"plain", "specstream"} <= set(summary) else None,
        "speedups_over_plain": speedups(summary, "plain"),
        "speedups_over_hf_generate": speedups(summary, "hf_generate"),
        "identical_outputs": identical,
        "divergences": divergences,
        "per_category": per_category,
        "machine": machine_info(base),
    }


def print_summary(result: dict) -> None:
    print(f"\n{result['model']} on {result['device']} ({result['dtype']}), {result['prompts']} prompts, "
          f"adapter: {result['adapter']}")
    print(f"{'method':>18} {'tokens':>7} {'seconds':>8} {'tok/s':>8} {'tok/pass':>8}")
    for method, s in result["methods"].items():
        print(f"{method:>18} {s['tokens']:>7} {s['seconds']:>8.2f} {s['tokens_per_s']:>8.2f} {s['mean_accepted']:>8.2f}")
    if result["speedup_vs_plain"]:
        print(f"specstream speedup over plain: {result['speedup_vs_plain']:.2f}x")
    print(f"identical outputs: {result['identical_outputs']} of {result['prompts']}")
    if result.get("stopped_early"):
        print(f"stopped early ({result['stopped_early']}): {result['prompts']} of {result['prompts_requested']} prompts")
    for d in result["divergences"][:5]:
        print(f"  divergence: {d}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m specstream.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=Path, required=True, help="Spec-Bench style JSONL")
    parser.add_argument("--limit", type=int, default=None, help="first N prompts")
    parser.add_argument("--category", default=None, help="only prompts of this Spec-Bench category")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--methods", default="plain,specstream,hf_generate", help=f"comma-separated: {', '.join(METHODS)}")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--adapter", default=None, help="adapter folder; default: the one in assets/, else a fresh one")
    parser.add_argument("--model", default=None, help="checkpoint folder or hub id; default: SmolLM2-135M-Instruct")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto (float32), float32, float16 or bfloat16")
    parser.add_argument("--top-k", default=",".join(map(str, DecodeSettings.top_k)), help="candidates per depth")
    parser.add_argument("--node-budget", type=int, default=DecodeSettings.node_budget)
    parser.add_argument("--prune-threshold", type=float, default=DecodeSettings.prune_threshold)
    parser.add_argument("--gamma", type=int, default=None)
    parser.add_argument("--tree", default=DecodeSettings.tree, choices=("auto", "fixed"),
                        help="auto: the node budget (at most --node-budget) that measured pass costs favour")
    parser.add_argument("--lookup-tokens", type=int, default=DecodeSettings.lookup_tokens,
                        help="prompt-lookup branch length; 0 = off")
    parser.add_argument("--stream-pass", default=DecodeSettings.stream_pass, choices=STREAM_PASSES)
    parser.add_argument("--phrase-mix", type=float, default=DecodeSettings.phrase_mix,
                        help="weight of the phrase table's next-token shares in ranking drafts; 0 = off")
    parser.add_argument("--context-mix", type=float, default=DecodeSettings.context_mix,
                        help="weight of the next-token shares in the prompt and reply so far in ranking drafts; 0 = off")
    parser.add_argument("--report", type=Path, nargs="?", const=Path("assets"), default=None,
                        help="write results.md and results.png into this folder (default: assets/)")
    parser.add_argument("--kept-costs", action="store_true",
                        help="plan with the pass costs kept on disk by an earlier process instead of measuring them afresh")
    parser.add_argument("--time-limit", type=float, default=0,
                        help="seconds from the start after which no further prompt starts; the report covers the prompts run (0: none)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.max_new_tokens < 1:
        raise SystemExit("--max-new-tokens must be at least 1")
    try:
        result = benchmark(args)
    except (AdapterError, ModelLoadError, SettingsError) as error:
        raise SystemExit(f"error: {error}") from None
    print_summary(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.report:
        for path in write_report(result, args.report):
            print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
