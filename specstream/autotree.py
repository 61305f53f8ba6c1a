"""The "auto" tree: the node budget that maximises expected tokens per second on this device.

A drafted node is accepted only if its parent was, so the expected tokens of one pass are the
bonus token plus, over the drafted nodes, the product along each node's path of the acceptance
rate at that (depth, rank). `build_tree` keeps the nodes of highest path probability, so the best
`n` nodes by expected acceptance stand in for the tree it will build. Dividing by the measured
cost of a pass over `n` nodes gives tokens per second; the budget with the most wins. Copied
tokens (prompt lookup, phrase table) are priced the same way: each pass's chain keeps the positions
whose chance of being reached and accepted pays for one more node at the measured per-node cost,
with rates kept per kind of chain (its source and how long an ending of the text it matched). Rates start
from a weak prior and follow the step records of this model's runs (dynamic, as in EAGLE-2 and
Sequoia, but per budget rather than per node, which keeps the Python per pass small).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace

from .costs import PassCosts
from .records import COPIED_SOURCES, StepRecord
from .tree import Fate

# Prior acceptance of the stream's top choice at depth 1, halved per rank and per extra depth, worth
# this many observations: weak enough that a few passes of real statistics outweigh it.
PRIOR_TOP1 = 0.5
PRIOR_WEIGHT = 4.0
PRIOR_LOOKUP = 0.5  # prior acceptance of a copied token given the one before it was accepted
MIN_BUDGET = 2  # the root and at least one draft
# Observations each (depth, rank) remembers, about one 128-token reply's passes: the statistics are
# shared by a model's runs in a process, and a code prompt after a chat prompt should not be
# planned with the chat's acceptance rates for long.
WINDOW = 100.0
REPLAN_EVERY = 4  # passes between budget choices; each choice costs about 0.3 ms (2-core Xeon)
# A kind of copied chain priced out of the tree is never verified, so its rate could never recover
# (the statistics outlive a reply): after this many passes that found it and grafted none of it,
# one token is grafted to look again. At about 3 ms a node on a 2-core CPU that costs a fraction of a
# millisecond per pass of that kind.
EXPLORE_EVERY = 16
# Passes the timed-pass correction averages over: the tables' errors on a busy machine (a few per cent
# between depths) are smaller than one pass's noise, so it takes many passes to see them.
TIMING_WINDOW = 200.0
# The timed passes also refit the tables' shape: what a pass's nodes add over a pass without drafts, against
# what that base costs. Worth this many passes of "the tables' shape is right" before the first pass is
# timed, and kept within SHAPE_RANGE of it. A start-up table is a snapshot of a shared machine: one read
# 4 nodes at 1.61x a plain step where they cost 1.27-1.31x timed alone the same hour, and a plain step is
# bound by memory where a tree's rows are bound by arithmetic, so the two move apart as neighbours come and go.
SHAPE_PRIOR = 5.0
SHAPE_RANGE = (0.5, 2.0)
REFIT_SHAPE = True  # False keeps the tables' shape (A/B runs)
# A depth the plans never pick is never timed, so its table could never be corrected: after this many
# timed passes without it, one replanning window drafts at that depth (a few per cent of the passes).
EXPLORE_DEPTH_EVERY = 96


@dataclass(frozen=True)
class Plan:
    node_budget: int  # stream-tree nodes, root included
    expected_tokens_per_pass: float
    expected_speedup: float  # over plain decoding, from the measured pass costs
    # What one node's time would yield at this plan's rate, in tokens: a copied token is worth its
    # node when its chance of being reached and accepted is higher.
    copy_price: float = 0.0
    depth: int = 0  # streams drafted per node (the tree's depth); 0 = the decode settings' depth


def _remember(tried: list[float], accepted: list[float], index: int, hit: bool) -> None:
    tried[index] += 1
    accepted[index] += hit
    if tried[index] > WINDOW:  # forget the oldest evenly: an exponential moving window
        accepted[index] *= WINDOW / tried[index]
        tried[index] = WINDOW


class AcceptanceStats:
    """Per (depth, rank): how often a verified stream draft (its parent accepted) was accepted."""

    def __init__(self, depth: int, width: int):
        self.tried = [[PRIOR_WEIGHT] * width for _ in range(depth)]
        self.accepted = [
            [PRIOR_WEIGHT * PRIOR_TOP1 * 0.5 ** (d + r) for r in range(width)] for d in range(depth)
        ]

    def rate(self, depth: int, rank: int) -> float:
        """Chance that the draft of `rank` at `depth` (both from 1 and 0) is accepted, given its parent was."""
        if depth > len(self.tried) or rank >= len(self.tried[0]):
            return 0.0
        return self.accepted[depth - 1][rank] / self.tried[depth - 1][rank]

    def observe(self, record: StepRecord) -> None:
        for node in record.nodes:
            verified = node.fate in (Fate.ACCEPTED, Fate.REJECTED)
            if node.source != "stream" or not verified or node.depth > len(self.tried) or node.rank >= len(self.tried[0]):
                continue
            _remember(self.tried[node.depth - 1], self.accepted[node.depth - 1], node.rank, node.fate == Fate.ACCEPTED)


class LookupStats:
    """Per position in a copied chain (its depth): how often a verified copied token was accepted."""

    def __init__(self, length: int):
        self.tried = [PRIOR_WEIGHT] * length
        self.accepted = [PRIOR_WEIGHT * PRIOR_LOOKUP] * length

    def rate(self, position: int) -> float:
        """Chance that the copied token at `position` (from 1) is accepted, given the one before it was."""
        return self.accepted[position - 1] / self.tried[position - 1] if position <= len(self.tried) else 0.0

    def observe(self, nodes) -> None:
        for node in nodes:
            if node.source in COPIED_SOURCES and node.fate in (Fate.ACCEPTED, Fate.REJECTED) and node.depth <= len(self.tried):
                _remember(self.tried, self.accepted, node.depth - 1, node.fate == Fate.ACCEPTED)


CopyKind = tuple[str, int]  # the chain's source and the length of the text's ending it matched


class CopiedStats:
    """Copied chains' acceptance per kind, and how often passes find each kind. The kinds differ
    more than the positions do: offline, on 150 held-out greedy replies, the first copied token was
    accepted 82 % of the time after a 3-token prompt-lookup match and 22 % after a 1-token one, and
    45 % vs 15 % for the phrase table, so one pooled rate grafts long chains where they fail."""

    def __init__(self, length: int):
        self.length = length
        self.kinds: dict[CopyKind, LookupStats] = {}
        self.share: dict[CopyKind, float] = {}  # moving share of passes that found each kind
        self.unverified: dict[CopyKind, int] = {}  # passes in a row that found each kind and grafted none

    def of(self, kind: CopyKind) -> LookupStats:
        return self.kinds.setdefault(kind, LookupStats(self.length))

    def observe(self, record: StepRecord) -> None:
        kind = (record.copied_source, record.copied_key) if record.copied_key else None
        for known in self.share:
            self.share[known] *= 1 - 1 / WINDOW
        if kind:
            self.share[kind] = self.share.get(kind, 0.0) + 1 / WINDOW
            self.of(kind).observe(record.nodes)
            grafted = any(node.source in COPIED_SOURCES for node in record.nodes)
            self.unverified[kind] = 0 if grafted else self.unverified.get(kind, 0) + 1

    def chain_length(self, kind: CopyKind, max_tokens: int, price: float) -> int:
        length = lookup_length(self.of(kind), max_tokens, price)[0]
        if length == 0 and self.unverified.get(kind, 0) >= EXPLORE_EVERY:
            return min(1, max_tokens)
        return length

    def expected(self, max_tokens: int, price: float) -> tuple[float, float]:
        """Copied nodes and accepted copied tokens a pass is expected to add, over the kinds seen."""
        nodes = added = 0.0
        for kind, share in self.share.items():
            length, tokens = lookup_length(self.of(kind), max_tokens, price)
            nodes += share * length
            added += share * tokens
        return nodes, added


def lookup_length(stats: LookupStats, max_tokens: int, price: float) -> tuple[int, float]:
    """How many copied tokens are worth a node each, and the tokens they are expected to add: the
    position's chance of being reached and accepted must beat `price`, what the node's time would
    otherwise yield at the pass's rate."""
    reach, added = 1.0, 0.0
    for position in range(1, max_tokens + 1):
        reach *= stats.rate(position)
        if reach < price:
            return position - 1, added
        added += reach
    return max_tokens, added


def expected_tokens(stats: AcceptanceStats, top_k: tuple[int, ...], node_budget: int) -> float:
    """1 + expected accepted drafts of the best `node_budget - 1` nodes of the top-k tree."""
    return expected_tokens_by_budget(stats, top_k, node_budget)[-1]


def expected_tokens_by_budget(stats: AcceptanceStats, top_k: tuple[int, ...], max_budget: int) -> list[float]:
    """expected_tokens for every node budget from 0 to `max_budget` (the best nodes are added one by
    one, so one expansion gives them all; a budget past the whole tree gets the whole tree's)."""
    frontier = [(-stats.rate(1, r), 1) for r in range(top_k[0])] if top_k else []
    heapq.heapify(frontier)
    totals = [1.0, 1.0]
    while frontier and len(totals) <= max_budget:
        negative, depth = heapq.heappop(frontier)
        totals.append(totals[-1] - negative)
        if depth < len(top_k):
            for rank in range(top_k[depth]):
                heapq.heappush(frontier, (negative * stats.rate(depth + 1, rank), depth + 1))
    totals += [totals[-1]] * (max_budget + 1 - len(totals))
    return totals[: max_budget + 1]


def choose(
    stats: AcceptanceStats,
    top_k: tuple[int, ...],
    costs: PassCosts,
    max_budget: int,
    copied: CopiedStats | None = None,
    max_lookup: int = 0,
) -> Plan:
    """The budget (a measured tree size up to `max_budget`) with the most expected tokens per
    second, copied chains (up to `max_lookup` tokens) included."""
    best: Plan | None = None
    by_budget = expected_tokens_by_budget(stats, top_k, max_budget)
    for size in sorted(costs.tree):
        if size < MIN_BUDGET:
            continue  # a pass without drafts costs more than a plain step and would never learn its rates
        if size > max_budget:
            break
        tokens = by_budget[size]
        node = costs.node_seconds(size)
        price = node * tokens / costs.seconds(size, tokens)
        nodes, added = copied.expected(max_lookup, price) if copied is not None and max_lookup else (0.0, 0.0)
        seconds = costs.seconds(size, tokens + added) + nodes * node
        plan = Plan(size, tokens + added, (tokens + added) * costs.plain / seconds, price)
        if best is None or plan.expected_speedup > best.expected_speedup:
            best = plan
    return best or Plan(max_budget, by_budget[max_budget], 1.0)


def choose_depth(
    stats: AcceptanceStats,
    top_k: tuple[int, ...],
    costs: dict[int, PassCosts],
    max_budget: int,
    copied: CopiedStats | None = None,
    max_lookup: int = 0,
    times: PassTimes | None = None,
) -> Plan:
    """The depth (streams per node, from the keys of `costs`, each depth's measured pass costs) and
    the plan at that depth with the most expected tokens per second. A deeper tree wins where its
    extra stream rows are cheap (a GPU); on a small CPU their cost can outweigh the third stream's
    few accepted drafts. `times` corrects each depth's prices by its passes timed so far."""
    plans = [
        replace(choose(stats, top_k[:depth], table, max_budget, copied, max_lookup), depth=depth)
        for depth, table in sorted(costs.items())
    ]
    if times is None:
        return max(plans, key=lambda plan: plan.expected_speedup)
    return max(plans, key=lambda plan: plan.expected_speedup / times.factor(plan.depth))


class PassTimes:
    """How the passes actually timed compare with the cost tables' prices for them: a ratio per depth,
    and one over all depths. The tables, measured once at start-up, can misprice one depth against
    another by more than the streams' gain (a one-node pass at depth 3 priced below one at depth 1 on a
    busy machine); the passes of a run are many more measurements of the same thing."""

    ALL = 0  # the key of the ratio over all depths (depths count from 1)

    def __init__(self):
        self.ratio: dict[int, float] = {}  # running mean of timed / priced, by depth and over ALL
        self.count: dict[int, float] = {}  # observations in each running mean, at most TIMING_WINDOW
        # Running means of the tokens passes yielded and the tokens their plans expected, by depth and
        # over ALL: a depth's acceptance can be mispredicted too. On 16 Spec-Bench prompts (2-core Xeon,
        # phrase shares on) depth-3 plans expected 2.13 tokens a pass and yielded 1.78, depth 1 2.0 and 2.09.
        self.tokens: dict[int, list[float]] = {}
        self.seen = 0  # passes timed
        self.last: dict[int, int] = {}  # the pass count when each depth was last timed
        # Moving sums over timed passes of base^2, base * extra, extra^2, base * timed, extra * timed and a
        # count, where base is the table's price of the pass without drafts and extra what the nodes add.
        self.moments = [0.0] * 6

    def stale(self, depths) -> int | None:
        """A depth not timed for EXPLORE_DEPTH_EVERY passes, if any."""
        return next((d for d in sorted(depths) if self.seen - self.last.get(d, 0) > EXPLORE_DEPTH_EVERY), None)

    def observe(self, depth: int, seconds: float, predicted: float, tokens: float | None = None,
                expected: float | None = None, base: float | None = None) -> None:
        """A pass at `depth` took `seconds` where its table priced it at `predicted`; it yielded
        `tokens` where its plan expected `expected`; `base` is the table's price of a pass at that depth
        without drafts (all three optional)."""
        if predicted <= 0 or seconds <= 0:
            return
        if base is not None and 0 < base <= predicted:
            extra = predicted - base
            keep = 1.0 - 1.0 / TIMING_WINDOW
            terms = (base * base, base * extra, extra * extra, base * seconds, extra * seconds, 1.0)
            self.moments = [keep * old + new for old, new in zip(self.moments, terms)]
        self.seen += 1
        self.last[depth] = self.seen
        ratio = seconds / predicted
        for key in (depth, self.ALL):
            count = min(self.count.get(key, 0.0) + 1.0, TIMING_WINDOW)
            old = self.ratio.get(key, ratio)
            self.ratio[key], self.count[key] = old + (ratio - old) / count, count
            if tokens is not None and expected:
                means = self.tokens.setdefault(key, [tokens, expected])
                means[0] += (tokens - means[0]) / count
                means[1] += (expected - means[1]) / count

    def _yield(self, key: int) -> float:
        """Tokens yielded per token expected (1 until known)."""
        means = self.tokens.get(key)
        return means[0] / means[1] if means and means[1] > 0 else 1.0

    def factor(self, depth: int) -> float:
        """What to divide depth's expected speed by, relative to the others: its timed / priced seconds
        over its yielded / expected tokens, 1 until a depth has been timed (what the tables and the
        statistics get wrong at every depth alike is divided out)."""
        if depth not in self.ratio:
            return 1.0
        return (self.ratio[depth] / self._yield(depth)) / (self.ratio[self.ALL] / self._yield(self.ALL))

    def shape(self) -> float:
        """How much dearer, against the tables, the timed passes found what nodes add over a pass without
        drafts than that base itself: timed = a * base + b * extra fitted by least squares, pulled towards
        a = b by SHAPE_PRIOR passes at the mean base and extra; b / a, within SHAPE_RANGE (1 untimed)."""
        bb, be, ee, by, ey, count = self.moments
        if count <= 0 or ee <= 0:
            return 1.0
        overall = (by + ey) / (bb + 2 * be + ee)  # timed over priced, summed: where the prior pulls both
        pull_b, pull_e = SHAPE_PRIOR * bb / count, SHAPE_PRIOR * ee / count
        a11, a22 = bb + pull_b, ee + pull_e
        r1, r2 = by + pull_b * overall, ey + pull_e * overall
        determinant = a11 * a22 - be * be
        if determinant <= 0:
            return 1.0
        a, b = (r1 * a22 - be * r2) / determinant, (a11 * r2 - be * r1) / determinant
        if a <= 0:
            return SHAPE_RANGE[1]
        return min(max(b / a, SHAPE_RANGE[0]), SHAPE_RANGE[1])

    def reshaped(self, tables: dict[int, PassCosts]) -> dict[int, PassCosts]:
        """Each table (by depth) with what its nodes add over its base scaled by `shape`."""
        shape = self.shape() if REFIT_SHAPE else 1.0
        if shape == 1.0:
            return tables
        return {depth: _scaled_nodes(costs, shape) for depth, costs in tables.items()}


def _base(costs: PassCosts) -> float:
    """A table's price of a pass without drafts (its smallest tree): what the shape refit measures nodes against."""
    return costs.tree[min(costs.tree)]


def _scaled_nodes(costs: PassCosts, shape: float) -> PassCosts:
    base = _base(costs)
    return replace(costs, tree={size: base + shape * (seconds - base) for size, seconds in costs.tree.items()})


def _priced_size(costs: PassCosts, nodes: int) -> int:
    """The measured tree size that prices a pass over `nodes` nodes: the smallest at least as big."""
    sizes = sorted(costs.tree)
    return next((size for size in sizes if size >= nodes), sizes[-1])


class TreePlanner:
    """Chooses each pass's depth and node budget from the device's measured pass costs and the acceptance
    statistics of this model's runs so far (kept per model and process, so later runs start
    from what earlier ones saw)."""

    def __init__(
        self,
        top_k: tuple[int, ...],
        max_budget: int,
        stats: AcceptanceStats,
        costs: dict[int, PassCosts],  # by depth
        copied: CopiedStats | None = None,
        max_lookup: int = 0,
        times: PassTimes | None = None,
    ):
        self.top_k, self.max_budget, self.stats, self.costs = top_k, max_budget, stats, costs
        self.copied, self.max_lookup, self.times = copied, max_lookup, times
        self.passes = 0
        self.plan = self._choose()

    def _choose(self) -> Plan:
        stale = self.times.stale(self.costs) if self.times is not None and len(self.costs) > 1 else None
        costs = self.costs if stale is None else {stale: self.costs[stale]}
        if self.times is not None:
            costs = self.times.reshaped(costs)
        return choose_depth(self.stats, self.top_k, costs, self.max_budget, self.copied, self.max_lookup, self.times)

    def chain_length(self, kind: CopyKind) -> int:
        """Copied tokens worth grafting this pass, for a chain of this kind."""
        if self.copied is None:
            return 0
        return self.copied.chain_length(kind, self.max_lookup, self.plan.copy_price)

    def copied_rate(self, kind: CopyKind, position: int) -> float:
        """The chance that a copied token of this kind at `position` (from 1) is accepted, given the one before it was."""
        return self.copied.of(kind).rate(position) if self.copied is not None else PRIOR_LOOKUP

    def observe(self, record: StepRecord) -> None:
        self.stats.observe(record)
        if self.copied is not None:
            self.copied.observe(record)
        depth = record.stream_depth  # the streams this pass computed, which its table prices
        if self.times is not None and record.nodes and depth in self.costs:
            table = self.costs[depth]
            predicted = table.seconds(_priced_size(table, len(record.nodes)), len(record.emitted_tokens))
            self.times.observe(depth, record.seconds, predicted, len(record.emitted_tokens),
                               record.expected_tokens_per_pass, base=_base(table))
        self.passes += 1
        if self.passes % REPLAN_EVERY == 0:
            self.plan = self._choose()
