"""What one forward pass costs on the running device, by tree size.

On a GPU a pass over 8 to 64 nodes costs about what one token costs; on a small CPU it does not,
so the tree worth drafting depends on the machine. These timings feed the "auto" tree and the
ablation in the model card. Measuring takes seconds, so the table is kept per process and on disk.
"""

from __future__ import annotations

import hashlib
import json
import platform
import statistics
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .loading import cache_root
from .streams import SpeculativeModel
from .tree import tree_attention_mask

# Tree sizes the auto tree chooses from (root included); 1 is a pass with streams but no drafts.
SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
# Nodes that carry streams in a pass of stream_pass "likely", for its cost table: 16 Spec-Bench prompts
# averaged 2.4 to 3.1 (the root and the likeliest one or two drafts); the rare second pass is not priced.
LIKELY_SOURCES = 3
# Start-up tables are measured again (up to MEASURE_ATTEMPTS times, keeping the least skewed) while a
# depth's one-node pass strays more than MAX_SKEW from the plain step: a busy moment on a shared machine
# can slow one depth's rows of every round.
MEASURE_ATTEMPTS, MAX_SKEW = 3, 0.15
# The sizes one node's cost is fitted over: about what a copied chain adds on top of a small tree.
NODE_SPAN = 16
_measured: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_afresh: weakref.WeakSet = weakref.WeakSet()  # models whose tables on disk this process must not trust
COST_MODEL = "v16: trees of 96 and 128 nodes priced too; v15: the layers below the streams and the stream layers each in one C call; rotary rows from a table; drafts' top-k in C; v14: lossless adapter pairs in bfloat16, int8 draft head in AMX tiles; each decoder layer of a decoding pass in one C call (attention, KV writes, low-rank pairs, silu included); every depth's tree table timed in the same rounds; paired tiles in the AVX-512 matmul; greedy token from a bfloat16 screen of the head (AMX tiles where present); bfloat16 draft head; tree tables scaled to the plain step; CPU kernels for matmuls (prefetching the next tile; 16 rows a read with AVX-512), RMSNorm and rotary; verification head over every row with them; attention bias made once per pass"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _bushy_parents(size: int, branching: int = 3) -> list[int]:
    """A tree of `size` nodes filled breadth-first, `branching` children per node."""
    return [-1] + [(i - 1) // branching for i in range(1, size)]


@torch.inference_mode()
def pass_seconds(
    model: SpeculativeModel,
    sizes: list[int],
    prompt_length: int = 200,
    repeats: int = 7,
    deferred: bool = False,
    depth: int | None = None,
    sources: int = 0,
    reference: bool = False,
) -> dict[int, float]:
    """Median wall time of one decoding pass (tree forward, verification logits, draft logits at
    one node) per tree size; size 1 without streams is a plain decoding step. `deferred` computes
    the streams as a deferred decoder does: one node's, after the tree pass; `depth` streams per
    node (default: all of the adapter's); `sources` > 0 computes streams at that many nodes only
    (stream_pass "likely"), 0 at every node. `reference` also times a plain step in the same rounds,
    as size 0."""
    depth = model.gamma if depth is None else depth
    tables = tree_seconds(model, sizes, [depth], prompt_length, repeats, deferred, sources, reference)
    return {size: seconds for table in tables.values() for size, seconds in table.items()}


@torch.inference_mode()
def tree_seconds(
    model: SpeculativeModel,
    sizes: list[int],
    depths: list[int],
    prompt_length: int = 200,
    repeats: int = 7,
    deferred: bool = False,
    sources: int = 0,
    reference: bool = False,
) -> dict[int, dict[int, float]]:
    """`pass_seconds` for several stream depths at once, all timed in the same rounds: {depth: {size:
    seconds}}, and with `reference` a plain step as {0: {0: seconds}}."""
    device = model.weights.device
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.shape.vocab_size, (prompt_length,), generator=generator).to(device)
    cache = model.new_cache(prompt_length + max(sizes) * (1 + model.gamma) + 1)
    causal = torch.ones(prompt_length, prompt_length, dtype=torch.bool, device=device).tril()
    model.forward(cache, prompt, torch.arange(prompt_length, device=device), causal)
    cache.advance(prompt_length)
    passes = {(depth, size): _measured_pass(model, cache, size, prompt_length, generator, deferred, depth, sources)
              for depth in depths for size in sizes}
    if reference:
        passes[0, 0] = _measured_pass(SpeculativeModel(model.weights, None), cache, 1, prompt_length, generator, False, 0)
    timings: dict[tuple[int, int], list[float]] = {key: [] for key in passes}
    # Round-robin over the sizes, so that a burst of load from a neighbour on a shared machine
    # spreads over all sizes instead of inflating one of them.
    for _ in range(repeats + 1):  # the first round is a warm-up
        for key, run in passes.items():
            _sync(device)
            started = time.perf_counter()
            run()
            _sync(device)
            timings[key].append(time.perf_counter() - started)
    tables: dict[int, dict[int, float]] = {}
    for (depth, size), times in timings.items():
        tables.setdefault(depth, {})[size] = statistics.median(times[1:])
    return tables


def _measured_pass(model: SpeculativeModel, cache, size: int, prompt_length: int, generator, deferred: bool, depth: int,
                   sources: int = 0):
    """One decoding pass over a bushy tree of `size` random nodes, as a callable."""
    device = model.weights.device
    parents = _bushy_parents(size)
    tokens = torch.randint(0, model.shape.vocab_size, (size,), generator=generator).to(device)
    depths = torch.zeros(size, dtype=torch.long)
    for i in range(1, size):
        depths[i] = depths[parents[i]] + 1
    positions = depths.to(device) + prompt_length
    mask = tree_attention_mask(parents, device)
    deferred = deferred or model.streams_need_bonus
    streams = "all" if size > 1 and model.adapter is not None and not deferred else None
    if streams and sources:
        streams = list(range(min(sources, size)))

    def run() -> None:
        out = model.forward(cache, tokens, positions, mask, stream_sources=streams, gamma=depth or None)
        # As the decoder verifies: row by row, one per accepted token (random drafts: the root
        # alone; `per_token` prices the rest), or every row at once.
        model.greedy(out.main_hidden[:1] if model.verifies_row_by_row else out.main_hidden)
        stream_hidden = out.stream_hidden[0] if out.stream_hidden is not None else None
        if deferred and model.adapter is not None:
            stream_hidden = model.streams_at_end(cache, out.early_hidden[-1], depth, bonus=0)
        if stream_hidden is not None:
            model.draft_topk(stream_hidden, 4)

    return run


@dataclass(frozen=True)
class PassCosts:
    plain: float  # seconds of a plain decoding step
    tree: dict[int, float]  # seconds of a tree pass by tree size, verifying its root only
    per_token: float  # seconds each further accepted token adds (one LM head row; 0 where rows run at once)

    def seconds(self, size: int, tokens: float) -> float:
        """A pass over `size` nodes that yields `tokens` tokens (accepted drafts plus the bonus)."""
        return self.tree[size] + max(tokens - 1.0, 0.0) * self.per_token

    def node_seconds(self, size: int) -> float:
        """What one more node adds to a pass over `size` nodes: the least-squares slope of the measured
        times over the sizes from `size` to `size + NODE_SPAN` (from the last two sizes beyond the
        table; never below zero, whatever the noise). Between two neighbouring sizes the slope is mostly
        noise: 0.25 ms from 2 to 3 nodes in one table where a node costs 3 ms on average."""
        sizes = sorted(self.tree)
        window = [s for s in sizes if size <= s <= size + NODE_SPAN]
        if len(window) < 2:
            window = sizes[-2:]
        if len(window) < 2:
            return 0.0
        mean_size = sum(window) / len(window)
        mean_time = sum(self.tree[s] for s in window) / len(window)
        spread = sum((s - mean_size) ** 2 for s in window)
        slope = sum((s - mean_size) * (self.tree[s] - mean_time) for s in window) / spread
        return max(slope, 0.0)


@torch.inference_mode()
def head_row_seconds(model: SpeculativeModel, repeats: int = 9) -> float:
    """One row of the LM head and its argmax: what each accepted token adds where the model
    verifies row by row; nothing where every row runs at once."""
    if not model.verifies_row_by_row:
        return 0.0
    row = torch.randn(model.shape.hidden_size, generator=torch.Generator().manual_seed(0)).to(model.weights.dtype)
    timings = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        model.greedy(row[None])
        timings.append(time.perf_counter() - started)
    return statistics.median(timings[1:])


def device_costs(model: SpeculativeModel, deferred: bool, depth: int | None = None, likely: bool = False) -> PassCosts:
    """The running device's pass costs with `depth` streams per node (default: all) at every node, or
    with `likely` at LIKELY_SOURCES nodes (about what stream_pass "likely" computes): measured once
    per model and process, and kept on disk for the next start. The plain step and the head row do
    not depend on the tree, so the tables of every depth share one measurement of them (and the
    speedups the auto tree compares across depths share one denominator)."""
    depth = model.gamma if depth is None else depth
    plain, per_token = _kept(
        model,
        _device_key(model, "plain step and head row"),
        lambda: {"plain": pass_seconds(SpeculativeModel(model.weights, None), [1], repeats=9)[1],
                 "per_token": head_row_seconds(model)},
        lambda raw: (float(raw["plain"]), float(raw["per_token"])),
    )
    mode = "deferred" if deferred else "likely" if likely else "joint"
    tables = _kept(
        model,
        _device_key(model, f"{mode} trees, depths 1 to {model.gamma}"),
        lambda: _tree_tables(model, plain, deferred, LIKELY_SOURCES if likely and not deferred else 0),
        lambda raw: {int(d): nondecreasing({int(size): float(seconds) for size, seconds in table.items()})
                     for d, table in raw.items()},
    )
    tree = tables[depth]
    return PassCosts(plain, tree, per_token)


def _tree_tables(model: SpeculativeModel, plain: float, deferred: bool, sources: int) -> dict[int, dict[int, float]]:
    """Every stream depth's tree-cost table, all timed in the same rounds beside a plain step, and
    scaled to the shared plain step. A busy minute on a shared machine slows a whole table, and the
    auto tree picks the depth by comparing tables: timed in separate rounds, a one-node pass read
    30.5 ms at depth 3 and 33.2 at depth 1 in one 80-prompt run (within a table the sizes' ratios
    repeat within 2-3 %), and that run drafted deeper trees: tau 2.15 but 1.47x plain, against
    tau 1.98 and 1.51x in the run before."""
    best = None
    for _ in range(MEASURE_ATTEMPTS):
        raw = tree_seconds(model, list(SIZES), list(range(1, model.gamma + 1)), repeats=5, deferred=deferred,
                           sources=sources, reference=True)
        reference = raw.pop(0)[0]
        skew = 0.0 if deferred else _skew(raw, reference)  # a deferred one-node pass has its second pass
        if best is None or skew < best[0]:
            best = (skew, {depth: {size: seconds * plain / reference for size, seconds in table.items()}
                           for depth, table in raw.items()})
        if skew <= MAX_SKEW:
            break
    return best[1]


def _skew(raw: dict[int, dict[int, float]], reference: float) -> float:
    """How far the tables' one-node passes, which compute no streams at any depth and so are plain
    steps, strayed from the plain step timed in the same rounds (0.1: 10 %). In one benchmark's start-up
    the depth-1 and -2 tables read 50.6 and 52.8 ms for them, depth 3 35.4 and the plain step 36.9: the
    auto tree then saw depth 3 as the cheapest and drafted it, 1.48x plain at tau 2.27 (out/bench-80-29.json)."""
    return max(abs(table[1] / reference - 1.0) for table in raw.values() if 1 in table)


def nondecreasing(table: dict[int, float]) -> dict[int, float]:
    """The table with each size's cost the least measured at that size or any bigger one. Timing
    noise on a shared machine only ever adds time: a neighbour's burst of load made, in one measured
    table, 1 node cost 69 ms and 2 nodes 52, and the auto tree would have read the second node as
    free. So where a smaller tree measured dearer than a bigger one, the bigger tree's time is the
    truer estimate of both (pooling them into their mean, as before, raised the bigger trees' cost
    instead, and kept a 4-node tree as dear as the 1-node outlier)."""
    smoothed, cheapest = {}, float("inf")
    for size in sorted(table, reverse=True):
        cheapest = min(cheapest, table[size])
        smoothed[size] = cheapest
    return dict(sorted(smoothed.items()))


def measure_afresh(model: SpeculativeModel) -> None:
    """Measure `model`'s pass costs again in this process instead of reading the tables kept on disk,
    and replace those. A kept table is only as good as the moment it was measured: one, measured at a
    busy moment on this project's shared machine, read 10-40 % dear and misshapen, and misled the auto
    tree of every later run until it was deleted."""
    _afresh.add(model)
    _measured.pop(model, None)


def _kept(model: SpeculativeModel, key: str, measure: Callable[[], dict], parse: Callable[[dict], Any]) -> Any:
    """A measurement by key: from this process, else from the file on disk, else measured now and written."""
    known = _measured.setdefault(model, {})
    if key not in known:
        path = cache_root() / "pass-costs.json"
        table = _read_json(path)
        try:
            if model in _afresh:
                raise KeyError(key)
            known[key] = parse(table[key])
        except (KeyError, TypeError, ValueError, AttributeError):  # missing or damaged: measure again
            table[key] = measure()
            _write_json(path, table)
            known[key] = parse(table[key])
    return known[key]


def cpu_name() -> str:
    """The CPU's model name (platform.processor() says only x86_64 on Linux)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), platform.machine())


def _device_key(model: SpeculativeModel, part: str) -> str:
    device = model.weights.device
    if device.type == "cuda":
        where = torch.cuda.get_device_name(device)
    else:
        where = f"{cpu_name()} x{torch.get_num_threads()}, {model.weights.matmul} matmul"
    config = model.adapter.config if model.adapter else None
    # COST_MODEL names what a measured pass includes; a new one makes old tables stale.
    parts = [COST_MODEL, where, str(model.weights.dtype), torch.__version__, repr(model.shape), part,
             f"{config.gamma}/{config.stream_layers}/{config.lora_rank}/{config.draft_vocab_size}" if config else "none"]
    if config and config.bonus_rank:  # its second pass also maps the bonus token
        parts.append(f"bonus {config.bonus_rank}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _read_json(path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing or damaged: measure again


def _write_json(path, table: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table, indent=1))
    except OSError:
        pass  # an unwritable cache only costs a re-measurement next start
