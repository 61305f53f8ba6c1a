"""The draft tree as data, and the pure functions that turn it into what a forward pass needs.

Node 0 is the root: the last emitted token, not yet in the KV cache. A node at depth d was
proposed by speculative stream d of the previous pass's deepest accepted node. Parents always
come before their children, so a slice of the node list is itself a tree.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from enum import Enum
from typing import Callable, Sequence

import torch

# A draft source beside the streams: the next-token shares after a text's last tokens ({} if unknown).
Followers = Callable[[tuple[int, ...]], dict[int, float]]


class Fate(str, Enum):
    ACCEPTED = "accepted"  # on the accepted path (the root always is)
    REJECTED = "rejected"  # verified: its parent's main stream chose another token
    PRUNED = "pruned"  # dropped at the early-exit layer, before the stream layers
    UNVERIFIED = "unverified"  # its parent was rejected, pruned or never verified


@dataclass(frozen=True)
class DraftNode:
    token: int
    parent: int  # index of the parent node; -1 for the root
    depth: int
    draft_prob: float  # the proposing stream's probability of this token; 1 for the root
    rank: int  # 0 for the stream's top choice
    path_prob: float  # product of draft probabilities from the root
    source: str = "stream"  # "root", "stream", "lookup" (copied from earlier text) or "phrase" (phrase table)


@dataclass(frozen=True)
class DraftTree:
    nodes: tuple[DraftNode, ...]

    def __len__(self) -> int:
        return len(self.nodes)

    @property
    def parents(self) -> list[int]:
        return [n.parent for n in self.nodes]

    @property
    def tokens(self) -> list[int]:
        return [n.token for n in self.nodes]

    @property
    def depths(self) -> list[int]:
        return [n.depth for n in self.nodes]


def root_only(token: int) -> DraftTree:
    return DraftTree((DraftNode(token, -1, 0, 1.0, 0, 1.0, "root"),))


def graft_chain(tree: DraftTree, chain: list[int], source: str = "lookup") -> DraftTree:
    """Add a chain of tokens below the root, sharing any prefix the tree already holds."""
    nodes = list(tree.nodes)
    current = 0
    for token in chain:
        child = next((i for i, n in enumerate(nodes) if n.parent == current and n.token == token), None)
        if child is None:
            nodes.append(DraftNode(token, current, nodes[current].depth + 1, 0.0, 0, 0.0, source))
            child = len(nodes) - 1
        current = child
    return DraftTree(tuple(nodes))


def build_tree(
    root_token: int,
    stream_probs: list[list[float]],
    stream_tokens: list[list[int]],
    top_k: tuple[int, ...],
    node_budget: int,
    followers: Sequence[tuple[float, Followers]] = (),
    history: tuple[int, ...] = (),
    free: Sequence[int] = (),
) -> DraftTree:
    """The best `node_budget` nodes of the tree of candidates, ranked by path probability.

    `stream_probs[d]` and `stream_tokens[d]` are stream d+1's candidates, best first; depth d+1
    takes its first `top_k[d]`. `followers` are (weight, source) pairs, a source giving the next-token
    shares after a text's last tokens (the phrase table's, the conversation's own): each node's
    children are ranked by the weighted sum of the shares that followed the text up to that node
    (`history`: the tokens before the root, as many as the longest key less one) and, with the
    weight left, the stream's probability. So siblings' children differ: a stream never sees the
    tokens between its context and the position it predicts; the sources' statistics do. A child's path
    probability never exceeds its parent's, so a best-first expansion yields a valid tree: every
    chosen node's parent was chosen before it. Nodes on `free`, a chain that will be grafted below
    the root anyway (`graft_chain`), cost no budget: the streams, and the shares ranking them, often
    propose the tokens prompt lookup copies, and those nodes merge with the chain when it is grafted.
    """
    nodes = [DraftNode(root_token, -1, 0, 1.0, 0, 1.0, "root")]
    depth_limit = min(len(top_k), len(stream_probs))
    keep = len(history) + 1
    texts = [(*history, root_token)] if followers else []  # each node's last `keep` tokens
    frontier: list[tuple[float, int, int, int, float]] = []  # (-path_prob, order, parent, token, prob)
    order = 0

    def push_children(parent: int) -> None:
        nonlocal order
        depth = nodes[parent].depth
        if depth >= depth_limit:
            return
        ranked = _children(stream_probs[depth], stream_tokens[depth], top_k[depth],
                           [(weight, source(texts[parent])) for weight, source in followers])
        for token, prob in ranked:
            heapq.heappush(frontier, (-nodes[parent].path_prob * prob, order, parent, token, prob))
            order += 1

    push_children(0)
    ranks: dict[int, int] = {}  # children drawn per parent so far: the next one's rank
    on_free = [True]  # whether each node lies on the free chain (the root does)
    spent = 1  # nodes that count against the budget, the root included
    while frontier and spent < node_budget:
        negative_prob, _, parent, token, prob = heapq.heappop(frontier)
        rank = ranks.get(parent, 0)
        ranks[parent] = rank + 1
        depth = nodes[parent].depth
        on_free.append(on_free[parent] and depth < len(free) and free[depth] == token)
        spent += not on_free[-1]
        nodes.append(DraftNode(token, parent, depth + 1, prob, rank, -negative_prob))
        if followers:
            texts.append((*texts[parent], token)[-keep:])
        push_children(len(nodes) - 1)
    return DraftTree(tuple(nodes))


def _children(probs: list[float], tokens: list[int], k: int,
              found: list[tuple[float, dict[int, float]]]) -> list[tuple[int, float]]:
    """A node's k likeliest children as (token, probability), best first. A source that knows
    nothing after this text gives its weight back to the stream."""
    found = [(weight, shares) for weight, shares in found if shares and weight > 0]
    if not found:
        return list(zip(tokens[:k], probs[:k]))
    stream_weight = 1 - sum(weight for weight, _ in found)
    mixed = {token: stream_weight * prob for token, prob in zip(tokens, probs)}
    for weight, shares in found:
        for token, share in shares.items():
            mixed[token] = mixed.get(token, 0.0) + weight * share
    return sorted(mixed.items(), key=lambda item: -item[1])[:k]


def tree_attention_mask(parents: list[int], device=None) -> torch.Tensor:
    """(T, T) bool: node i may attend to node j iff j is i itself or one of its ancestors."""
    rows: list[list[bool]] = []  # in Python: a torch op per node cost more than the list work
    for i, parent in enumerate(parents):
        row = list(rows[parent]) if parent >= 0 else [False] * len(parents)
        row[i] = True
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool, device=device)


def likely_ends(parents: list[int], acceptance: list[float], least: float) -> list[int]:
    """The nodes where the accepted path ends with a chance of at least `least` (the root always).

    `acceptance[i]` is the chance that node i is accepted (root: 1). Siblings are exclusive (one
    token can match), so the path ends at a node with its own chance less its children's."""
    ends = list(acceptance)
    for node, parent in enumerate(parents):
        if parent >= 0:
            ends[parent] -= acceptance[node]
    return [node for node, chance in enumerate(ends) if node == 0 or chance >= least]


def prune_by_score(parents: list[int], scores: list[float], threshold: float) -> list[bool]:
    """Keep a node iff its own score and all its ancestors' reach the threshold (root always)."""
    keep = []
    for i, parent in enumerate(parents):
        keep.append(parent < 0 or (keep[parent] and scores[i] >= threshold))
    return keep


def accept_longest_path(parents: list[int], tokens: list[int], kept: list[bool], choice_of: Callable[[int], int]) -> list[int]:
    """Greedy verification: from the root, follow the kept child whose token equals the main
    stream's choice at its parent. `choice_of(node)` is asked only for nodes on the accepted
    path, so it may compute choices lazily. Returns the accepted path's node indices, root first."""
    path = [0]
    while True:
        node = path[-1]
        wanted = choice_of(node)
        child = next((i for i, p in enumerate(parents) if p == node and kept[i] and tokens[i] == wanted), None)
        if child is None:
            return path
        path.append(child)


def node_fates(parents: list[int], kept: list[bool], path: list[int]) -> list[Fate]:
    on_path = set(path)
    fates = []
    for i, parent in enumerate(parents):
        if i in on_path:
            fates.append(Fate.ACCEPTED)
        elif not kept[i]:
            fates.append(Fate.PRUNED)
        elif parent in on_path:
            fates.append(Fate.REJECTED)
        else:
            fates.append(Fate.UNVERIFIED)
    return fates
