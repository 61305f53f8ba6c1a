"""Text the page shows, as pure functions of the model info, a trace and a selected step."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from ..records import StepRecord
from ..tree import Fate
from .highlight import visible
from .race import Side, Trace

TRACE_LIFETIME = 3600.0  # seconds a trace file stays on disk; a long-running Space must not fill its disk


def model_markdown(info: dict) -> str:
    if info["status"] == "loading":
        return ("⏳ **Loading the model in the background** (a few seconds; the very first start de-quantizes it, "
                "about 20 s). Type a prompt meanwhile: Run waits for it.")
    if info["status"] == "failed":
        return f"❌ {info['error']} Runs are disabled until the app is restarted with a model that loads."
    mode = (("**lossless**: the base weights are untouched, so both columns must show the same text"
             + ("" if info["dtype"] in ("float32", "float64") else
                f" up to logit ties, which {info['dtype']} makes common and a tree pass breaks differently"))
            if info["adapter_mode"] == "lossless" else
            "**shared**: the base model was fine-tuned with the streams, so replies may differ from the base model's")
    weights = info["weights"] if info["weights"].startswith(info["model"]) else f"{info['model']} ({info['weights']})"
    text = (f"**Model:** {weights} · **device:** {info['device']} · "
            f"**dtype:** {info['dtype']} · **matmul:** {info.get('matmul', 'torch')}  \n**Stream adapter:** {info['gamma']} streams in the top "
            f"{info['stream_layers']} layers, {mode}.")
    if info.get("bonus_rank"):
        text += (" Its streams also read the bonus token, which exists only after verification, so they run in "
                 "a short second pass after each tree pass.")
    if info["adapter_note"]:
        text += f"  \n⚠️ {info['adapter_note']}"
    return text


def side_markdown(side: Side, title: str, stopped: bool = False) -> str:
    stats = side.stats()
    if not stats.forward_passes:
        return f"**{title}**  \nwaiting…"
    state = "" if side.done else (" · stopped" if stopped else " · running")
    return (f"**{title}**{state}  \n{stats.tokens} tokens · **{stats.tokens_per_second:.1f} tokens/s** · "
            f"{stats.tokens_per_pass:.2f} tokens/pass · {stats.seconds:.2f} s")


def verdict_markdown(trace: Trace) -> str:
    """The live speedup, and whether the two replies are the same (or where they first differ)."""
    speedup = trace.speedup()
    tau = trace.specstream.stats().tokens_per_pass
    head = f"### ⚡ Speedup {speedup:.2f}× · {tau:.2f} tokens per forward pass" if speedup else "### ⚡ Speedup …"
    forecasts = [r.expected_speedup for r in trace.specstream.records if r.expected_speedup is not None]
    if speedup and forecasts:
        head += (f"\n\nThe auto tree's cost model expected {sum(forecasts) / len(forecasts):.2f}× "
                 "(mean over passes, from this machine's measured pass costs and the acceptance seen so far).")
    divergence = trace.divergence()
    if divergence:
        check = (f"⚠️ The replies differ from token {divergence.position + 1}: plain made "
                 f"`{visible(divergence.plain_text)}`, Speculative Streaming `{visible(divergence.specstream_text)}`.")
    elif trace.finished:
        check = f"✅ Identical replies ({len(trace.plain.tokens)} tokens)."
    else:
        check = "Same tokens so far." if trace.specstream.records else ""
    if trace.stopped:
        check += " ⏹ Stopped before the end."
    return f"{head}\n\n{check}"


def step_markdown(record: StepRecord | None, step_count: int) -> str:
    if record is None:
        return "Run a prompt to replay its steps."
    if not record.nodes:
        return (f"**Step 0 of {step_count - 1}**, the prefill pass: the prompt in one pass, which also drafts "
                f"the first tree. Made `{visible(''.join(record.emitted_texts))}`. {record.seconds * 1000:.0f} ms.")
    counts = {fate: sum(n.fate is fate for n in record.nodes[1:]) for fate in Fate}
    emitted = " ".join(f"`{visible(t)}`" for t in record.emitted_texts)
    return (f"**Step {record.step} of {step_count - 1}** · {len(record.nodes) - 1} drafted nodes: "
            f"{counts[Fate.ACCEPTED]} accepted, {counts[Fate.REJECTED]} rejected, {counts[Fate.PRUNED]} pruned, "
            f"{counts[Fate.UNVERIFIED]} never verified · made {emitted} (the last is the bonus token) · "
            f"{record.seconds * 1000:.0f} ms" + _streams(record) + _forecast(record))


def _streams(record: StepRecord) -> str:
    """Where this pass computed the streams that draft the next tree (nothing where it was every node)."""
    count = len(record.stream_nodes)
    where = "the root only" if count == 1 else f"{count} of its nodes"
    if record.second_pass:
        first = f"streams at {where}; " if count else ""
        return f" · {first}a short second pass computed the deepest accepted node's streams"
    return f" · streams at {where}" if 0 < count < len(record.nodes) else ""


def _forecast(record: StepRecord) -> str:
    if record.expected_tokens_per_pass is None:
        return ""
    depth = max((node.depth for node in record.nodes if node.source == "stream"), default=0)
    return (f" · auto tree chose {len(record.nodes)} nodes, stream depth {depth}, expecting "
            f"{record.expected_tokens_per_pass:.2f} tokens and {record.expected_speedup:.2f}× plain")


def write_trace_file(trace: Trace, info: dict) -> str:
    """The whole trace as a JSON file for the download button; files older than an hour are removed."""
    folder = Path(tempfile.gettempdir()) / "specstream-traces"
    folder.mkdir(exist_ok=True)
    for old in folder.glob("trace-*.json"):
        if time.time() - old.stat().st_mtime > TRACE_LIFETIME:
            old.unlink(missing_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=folder, prefix="trace-", suffix=".json", delete=False) as file:
        json.dump(trace.to_json(info), file, indent=1)
    return file.name
