"""The benchmark's results as the README shows them: a markdown table per Spec-Bench category and a
bar chart of tokens per second, written from the benchmark's JSON so they can be redrawn later.

    python -m specstream.report out/bench.json --out assets/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METHOD_COLOURS = {"plain": "#9ca3af", "specstream": "#2563eb", "hf_generate": "#f59e0b", "hf_prompt_lookup": "#10b981"}


def _rows(result: dict) -> list[tuple[str, int, dict, dict]]:
    rows = [(c, part["prompts"], part["methods"], part["speedup_vs_plain"]) for c, part in result["per_category"].items()]
    overall = {m: s["tokens_per_s"] / result["methods"]["plain"]["tokens_per_s"] for m, s in result["methods"].items()
               if m != "plain"} if "plain" in result["methods"] else {}
    return rows + [("**all**", result["prompts"], result["methods"], overall)]


def _where(machine: dict) -> str:
    if machine.get("gpu"):
        return machine["gpu"]
    cpu = machine.get("cpu") or machine.get("processor", "CPU")
    matmul = f", {machine['matmul']} matmul" if "matmul" in machine else ""
    return f"{cpu} ({machine.get('cpu_capability', '?')}), {machine.get('threads', '?')} threads{matmul}"


def _by_source(spec: dict | None) -> str:
    """Where the accepted drafts came from (older results did not record it)."""
    by = (spec or {}).get("accepted_per_pass_by_source")
    return "–" if by is None else " / ".join(f"{by.get(s, 0.0):.2f}" for s in ("stream", "lookup", "phrase"))


def markdown_table(result: dict) -> str:
    methods = list(result["methods"])
    header = ["category", "prompts", *[f"{m} tok/s" for m in methods], "τ (tokens/pass)",
              "accepted drafts/pass: streams / lookup / phrases", "× plain", "× hf_generate"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for category, prompts, stats, _ in _rows(result):
        speed = {m: stats[m]["tokens_per_s"] for m in methods}
        spec = stats.get("specstream")
        tau = f"{spec['mean_accepted']:.2f}" if spec else "–"
        over_plain = f"{speed['specstream'] / speed['plain']:.2f}" if spec and "plain" in speed else "–"
        over_hf = f"{speed['specstream'] / speed['hf_generate']:.2f}" if spec and "hf_generate" in speed else "–"
        cells = [category, str(prompts), *[f"{speed[m]:.1f}" for m in methods], tau, _by_source(spec), over_plain, over_hf]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    machine = result.get("machine", {})
    lines.append(f"{result['model']} on {result['device']} ({_where(machine)}, {result['dtype']}), torch {machine.get('torch', '?')}; "
                 f"{result['prompts']} Spec-Bench prompts, {result['settings']['max_new_tokens']} new tokens, greedy; "
                 f"identical outputs: {result['identical_outputs']} of {result['prompts']}.")
    if result.get("stopped_early"):
        lines.append(f"Stopped early ({result['stopped_early']}) after {result['prompts']} of "
                     f"{result['prompts_requested']} prompts.")
    return "\n".join(lines) + "\n"


def bar_chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display on a server
    import matplotlib.pyplot as plt

    rows = _rows(result)
    methods = list(result["methods"])
    width = 0.8 / len(methods)
    figure, axes = plt.subplots(figsize=(10, 4.2), dpi=120)
    for i, method in enumerate(methods):
        values = [stats[method]["tokens_per_s"] for _, _, stats, _ in rows]
        positions = [r + (i - (len(methods) - 1) / 2) * width for r in range(len(rows))]
        axes.bar(positions, values, width, label=method, color=METHOD_COLOURS.get(method))
    axes.set_xticks(range(len(rows)), [name.strip("*") for name, *_ in rows], rotation=20, ha="right")
    axes.set_ylabel("tokens per second (higher is faster)")
    where = _where(result.get("machine", {}))
    axes.set_title(f"{result['model']} · {result['device']} ({where}) · greedy, {result['prompts']} prompts", fontsize=10)
    axes.legend(frameon=False, ncols=len(methods))
    axes.spines[["top", "right"]].set_visible(False)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def write_report(result: dict, folder: Path) -> tuple[Path, Path]:
    """results.md and results.png in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    table, chart = folder / "results.md", folder / "results.png"
    table.write_text(markdown_table(result))
    bar_chart(result, chart)
    return table, chart


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m specstream.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("result", type=Path, help="a JSON file written by specstream.bench")
    parser.add_argument("--out", type=Path, default=Path("assets"))
    args = parser.parse_args(argv)
    try:
        result = json.loads(args.result.read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"cannot read {args.result}: {error}") from None
    for path in write_report(result, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
