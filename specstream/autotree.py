"""The "auto" tree: the node budget that maximises expected tokens per second on this device.

A drafted node is accepted only if its parent was, so the expected tokens of one pass are the
bonus token plus, over the drafted nodes, the product along each node's path of the acceptance
rate at that (depth, rank). `build_tree` keeps the nodes of highest path probability, so the best
`n` nodes by expected acceptance stand in for the tree it will build. Dividing by the measured
cost of a pass over `n` nodes gives tokens per second; the budget with the most wins. Rates start
from a weak prior and follow the step records of this model's runs (dynamic, as in EAGLE-2 and
Sequoia, but per budget rather than per node, which keeps the Python per pass small).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from .costs import PassCosts
from .records import StepRecord
from .tree import Fate

# Prior acceptance of the stream's top choice at depth 1, halved per rank and per extra depth, worth
# this many observations: weak enough that a few passes of real statistics outweigh it.
PRIOR_TOP1 = 0.5
PRIOR_WEIGHT = 4.0
MIN_BUDGET = 2  # the root and at least one draft
# Observations each (depth, rank) remembers, about one 128-token reply's passes: the statistics are
# shared by a model's runs in a process, and a code prompt after a chat prompt should not be
# planned with the chat's acceptance rates for long.
WINDOW = 100.0
REPLAN_EVERY = 4  # passes between budget choices; each choice costs well under a millisecond


@dataclass(frozen=True)
class Plan:
    node_budget: int
    expected_tokens_per_pass: float
    expected_speedup: float  # over plain decoding, from the measured pass costs


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
            d, r = node.depth - 1, node.rank
            self.tried[d][r] += 1
            self.accepted[d][r] += node.fate == Fate.ACCEPTED
            if self.tried[d][r] > WINDOW:  # forget the oldest evenly: an exponential moving window
                self.accepted[d][r] *= WINDOW / self.tried[d][r]
                self.tried[d][r] = WINDOW


def expected_tokens(stats: AcceptanceStats, top_k: tuple[int, ...], node_budget: int) -> float:
    """1 + expected accepted drafts of the best `node_budget - 1` nodes of the top-k tree."""
    frontier = [(-stats.rate(1, r), 1) for r in range(top_k[0])] if top_k else []
    heapq.heapify(frontier)
    total, nodes = 1.0, 1
    while frontier and nodes < node_budget:
        negative, depth = heapq.heappop(frontier)
        total -= negative
        nodes += 1
        if depth < len(top_k):
            for rank in range(top_k[depth]):
                heapq.heappush(frontier, (negative * stats.rate(depth + 1, rank), depth + 1))
    return total


def choose(stats: AcceptanceStats, top_k: tuple[int, ...], costs: PassCosts, max_budget: int) -> Plan:
    """The budget (a measured tree size up to `max_budget`) with the most expected tokens per second."""
    best: Plan | None = None
    for size in sorted(costs.tree):
        if size < MIN_BUDGET:
            continue  # a pass without drafts costs more than a plain step and would never learn its rates
        if size > max_budget:
            break
        tokens = expected_tokens(stats, top_k, size)
        plan = Plan(size, tokens, tokens * costs.plain / costs.seconds(size, tokens))
        if best is None or plan.expected_speedup > best.expected_speedup:
            best = plan
    return best or Plan(max_budget, expected_tokens(stats, top_k, max_budget), 1.0)


class TreePlanner:
    """Chooses each pass's node budget from the device's measured pass costs and the acceptance
    statistics of this model's runs so far (kept per model and process, so later runs start
    from what earlier ones saw)."""

    def __init__(self, top_k: tuple[int, ...], max_budget: int, stats: AcceptanceStats, costs: PassCosts):
        self.top_k, self.max_budget, self.stats, self.costs = top_k, max_budget, stats, costs
        self.passes = 0
        self.plan = self._choose()

    def _choose(self) -> Plan:
        return choose(self.stats, self.top_k, self.costs, self.max_budget)

    def observe(self, record: StepRecord) -> None:
        self.stats.observe(record)
        self.passes += 1
        if self.passes % REPLAN_EVERY == 0:
            self.plan = self._choose()
