"""Where the speed comes from: plain decoding and Speculative Streaming with one setting changed
at a time (tree size, pruning, prompt-lookup branches, where streams are computed), on the same prompts in one process, taking
turns on each prompt as the benchmark's methods do.

    python -m specstream.ablation --prompts FILE.jsonl --per-category 2 --max-new-tokens 128 \\
        --json OUT.json [--markdown OUT.md] [--adapter PATH]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from .adapter import AdapterError
from .bench import WARMUP_TOKENS, Outcome, Runner, machine_info, read_prompts, run_interleaved, summarise
from .decoding import DecodeSettings, SettingsError
from .engine import build_model, default_adapter_path
from .loading import ModelLoadError, load_base_model

# Each variant is the default with these fields changed; None is plain decoding. The fixed trees
# show what bigger trees buy in tau and cost in time; the default is the auto tree.
VARIANTS: dict[str, dict | None] = {
    "plain": None,
    "default (auto tree, prompt lookup, phrase table)": {},
    "streams' own ranking (no shares)": {"phrase_mix": 0.0, "context_mix": 0.0},
    "no phrase table (auto tree, prompt lookup)": {"phrases": False},
    "no copied branch (auto tree)": {"lookup_tokens": 0},
    "streams at every node (stream pass joint)": {"stream_pass": "joint"},
    "fixed tree, 4 nodes, no lookup": {"tree": "fixed", "node_budget": 4, "lookup_tokens": 0},
    "fixed tree, 8 nodes, no lookup": {"tree": "fixed", "node_budget": 8, "lookup_tokens": 0},
    "fixed tree, 16 nodes, no lookup": {"tree": "fixed", "node_budget": 16, "lookup_tokens": 0},
    "pruning on (threshold 0.05)": {"prune_threshold": 0.05},
}


def pick_per_category(prompts: list, count: int) -> list:
    """The first `count` prompts of each category, in file order."""
    taken: dict[str, int] = {}
    picked = []
    for prompt in prompts:
        if taken.get(prompt.category, 0) < count:
            taken[prompt.category] = taken.get(prompt.category, 0) + 1
            picked.append(prompt)
    return picked


def rows(outcomes: dict[str, list[Outcome]]) -> list[dict]:
    """One row per variant from the benchmark's own summary, against plain decoding's outputs and speed."""
    summary = summarise(outcomes)
    reference = [o.tokens for o in outcomes["plain"]]
    plain_rate = summary["plain"]["tokens_per_s"]
    return [{
        "setting": name,
        "tau": stats["mean_accepted"],
        "tokens_per_s": stats["tokens_per_s"],
        "speedup_vs_plain": round(stats["tokens_per_s"] / plain_rate, 3) if plain_rate else 1.0,
        "identical": sum(o.tokens == ref for o, ref in zip(outcomes[name], reference)),
    } for name, stats in summary.items()]


def markdown(rows: list[dict], prompts: int) -> str:
    lines = ["| setting | τ (tokens/pass) | tokens/s | × plain | identical |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['tau']:.2f} | {r['tokens_per_s']:.1f} | {r['speedup_vs_plain']:.2f} "
                     f"| {r['identical']}/{prompts} |")
    return "\n".join(lines) + "\n"


def ablate(args: argparse.Namespace) -> dict:
    prompts = pick_per_category(read_prompts(args.prompts, args.limit, None), args.per_category)
    if not prompts:
        raise SystemExit(f"no prompts in {args.prompts}")
    base = load_base_model(args.model, device=args.device, dtype=args.dtype)
    model = build_model(base, args.adapter or "default")
    default = DecodeSettings(max_new_tokens=args.max_new_tokens).validate(model)
    runners = {name: Runner(base, model, replace(default, **(change or {})).validate(model))
               for name, change in VARIANTS.items()}
    methods = {name: "plain" if change is None else "specstream" for name, change in VARIANTS.items()}
    prompt_ids = [base.chat_prompt(p.text) for p in prompts]
    # Warm-up: first-call allocations, and the auto tree's cost table and acceptance statistics.
    for name, runner in runners.items():
        runner.run(methods[name], prompt_ids[0], WARMUP_TOKENS)
    runs = {name: (lambda ids, name=name: runners[name].run(methods[name], ids, args.max_new_tokens))
            for name in runners}
    outcomes = run_interleaved(runs, prompt_ids, quiet=args.quiet)
    adapter_path = args.adapter or default_adapter_path(base)
    return {
        "model": base.name, "device": str(base.device), "dtype": str(base.dtype).replace("torch.", ""),
        "adapter": str(adapter_path) if adapter_path else "fresh (untrained)",
        "prompts": len(prompts), "prompt_file": str(args.prompts), "max_new_tokens": args.max_new_tokens,
        "variants": dict(VARIANTS),
        "rows": rows(outcomes),
        "machine": machine_info(base),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m specstream.ablation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=Path, required=True, help="Spec-Bench style JSONL")
    parser.add_argument("--limit", type=int, default=80, help="choose among the first N prompts")
    parser.add_argument("--per-category", type=int, default=2, help="prompts taken from each category")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here")
    parser.add_argument("--adapter", default=None, help="adapter folder; default: the one in assets/")
    parser.add_argument("--model", default=None, help="checkpoint folder or hub id; default: SmolLM2-135M-Instruct")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.max_new_tokens < 1 or args.per_category < 1:
        raise SystemExit("--max-new-tokens and --per-category must be at least 1")
    try:
        result = ablate(args)
    except (AdapterError, ModelLoadError, SettingsError) as error:
        raise SystemExit(f"error: {error}") from None
    table = markdown(result["rows"], result["prompts"])
    print(f"\n{result['model']} on {result['device']} ({result['dtype']}), {result['prompts']} prompts, "
          f"adapter: {result['adapter']}\n\n{table}")
    for path, text in ((args.json, json.dumps(result, indent=2) + "\n"), (args.markdown, table)):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
