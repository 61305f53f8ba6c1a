"""The draft tree's pure functions."""

import random

import torch

from specstream.lookup import lookup_continuation
from specstream.tree import (Fate, accept_longest_path, build_tree, graft_chain, likely_ends, node_fates, prune_by_score,
                             tree_attention_mask)


def test_build_tree_respects_budget_and_top_k():
    probs = [[0.6, 0.3, 0.1], [0.9, 0.1], [0.5, 0.5]]
    tokens = [[10, 11, 12], [20, 21], [30, 31]]
    tree = build_tree(7, probs, tokens, top_k=(3, 2, 1), node_budget=100)
    assert len(tree) == 1 + 3 + 3 * 2 + 3 * 2 * 1  # the full cartesian tree
    assert tree.nodes[0].token == 7 and tree.nodes[0].parent == -1
    small = build_tree(7, probs, tokens, top_k=(3, 2, 1), node_budget=5)
    assert len(small) == 5
    kept = sorted((n.path_prob for n in tree.nodes[1:]), reverse=True)[:4]
    assert sorted((n.path_prob for n in small.nodes[1:]), reverse=True) == kept
    for i, node in enumerate(tree.nodes[1:], 1):
        assert node.parent < i and node.depth == tree.nodes[node.parent].depth + 1
        assert node.token == tokens[node.depth - 1][node.rank]


def test_tree_attention_mask_is_ancestors_and_self():
    parents = [-1, 0, 0, 1, 3, 2]
    mask = tree_attention_mask(parents)
    for i in range(len(parents)):
        ancestors, node = set(), i
        while node >= 0:
            ancestors.add(node)
            node = parents[node]
        assert {j for j in range(len(parents)) if mask[i, j]} == ancestors
    assert mask.dtype == torch.bool


def test_prune_drops_whole_subtrees():
    parents = [-1, 0, 0, 1, 3]
    scores = [1.0, 0.05, 0.9, 0.9, 0.9]
    assert prune_by_score(parents, scores, 0.1) == [True, False, True, False, False]


def test_accept_and_fates():
    parents = [-1, 0, 0, 1, 1, 2, 3]
    tokens = [5, 6, 7, 8, 9, 10, 11]
    kept = [True] * 6 + [False]
    choice = [6, 9, 1, 11, 2, 3, None]
    asked = []
    path = accept_longest_path(parents, tokens, kept, lambda node: asked.append(node) or choice[node])
    assert path == [0, 1, 4]
    assert asked == [0, 1, 4]  # only the accepted path's choices are needed (the CPU computes them lazily)
    fates = node_fates(parents, kept, path)
    assert fates == [Fate.ACCEPTED, Fate.ACCEPTED, Fate.REJECTED, Fate.REJECTED, Fate.ACCEPTED, Fate.UNVERIFIED, Fate.PRUNED]


def test_random_trees_are_valid():
    rng = random.Random(0)
    for _ in range(50):
        depth = rng.randrange(1, 5)
        probs = [sorted((rng.random() for _ in range(5)), reverse=True) for _ in range(depth)]
        tokens = [[rng.randrange(100) for _ in range(5)] for _ in range(depth)]
        top_k = tuple(rng.randrange(1, 6) for _ in range(depth))
        tree = build_tree(1, probs, tokens, top_k, rng.randrange(1, 40))
        for i, node in enumerate(tree.nodes[1:], 1):
            assert 0 <= node.parent < i and node.rank < top_k[node.depth - 1]
            assert node.path_prob <= tree.nodes[node.parent].path_prob


def test_lookup_continuation_prefers_longest_latest_match():
    context = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert lookup_continuation(context, max_ngram=3, length=2) == [7, 8]  # "2 3" last seen before 7 8
    assert lookup_continuation([1, 2, 3], max_ngram=3, length=4) == []
    assert lookup_continuation([4, 5, 4], max_ngram=2, length=3) == [5, 4]


def test_graft_chain_shares_existing_prefix():
    tree = build_tree(7, [[0.9, 0.1]], [[10, 11]], top_k=(2,), node_budget=10)
    grafted = graft_chain(tree, [10, 12, 13])
    assert len(grafted) == len(tree) + 2
    new = grafted.nodes[len(tree):]
    assert [n.source for n in new] == ["lookup", "lookup"]
    assert grafted.nodes[new[0].parent].token == 10 and new[1].depth == 3


def test_likely_ends_are_where_the_path_stops_often_enough():
    # root -> a (0.6) -> c (0.5 of a: 0.3); root -> b (0.2); the path ends at the root with 0.2,
    # at a with 0.3, at b with 0.2, at c with 0.3.
    parents, acceptance = [-1, 0, 0, 1], [1.0, 0.6, 0.2, 0.3]
    assert likely_ends(parents, acceptance, 0.25) == [0, 1, 3]
    assert likely_ends(parents, acceptance, 0.0) == [0, 1, 2, 3]
    assert likely_ends(parents, [1.0, 0.9, 0.1, 0.9], 0.5) == [0, 3]  # the root always carries streams


def test_phrase_shares_rank_each_nodes_children_by_its_own_text():
    """With followers, a node's children are ranked by the mix of the stream's probability and the
    share that followed the text up to that node: siblings get different children, and the text
    includes the history before the root."""
    probs, tokens = [[0.5, 0.3, 0.2], [0.4, 0.35, 0.25]], [[10, 11, 12], [20, 21, 22]]
    shares = {(6, 7): {11: 1.0}, (7, 10): {22: 1.0}, (7, 11): {21: 0.5, 99: 0.5}}
    tree = build_tree(7, probs, tokens, top_k=(2, 2), node_budget=100, followers=[(0.5, lambda text: shares.get(text[-2:], {}))],
                      history=(6,))
    children = {}
    for node in tree.nodes[1:]:
        children.setdefault(tree.nodes[node.parent].token, []).append(node.token)
    assert children[7] == [11, 10]  # 0.5 * 0.3 + 0.5 beats 0.5 * 0.5: the text "6 7" was followed by 11
    assert children[10] == [22, 20] and children[11] == [21, 99]  # each parent's own followers
    assert [n.rank for n in tree.nodes if n.parent == 0] == [0, 1]
    assert all(n.path_prob <= tree.nodes[n.parent].path_prob for n in tree.nodes[1:])
    plain = build_tree(7, probs, tokens, top_k=(2, 2), node_budget=100)
    assert build_tree(7, probs, tokens, top_k=(2, 2), node_budget=100, followers=[(0.5, lambda text: {})],
                      history=(6,)) == plain  # no shares: the streams' own ranking


def test_nodes_on_the_chain_to_be_grafted_cost_no_budget():
    """The stream tree may rank the copied chain's tokens itself; those nodes merge with the chain
    when it is grafted, so they must not take the place of other candidates."""
    probs, tokens = [[0.6, 0.3, 0.1], [0.7, 0.2, 0.1]], [[10, 11, 12], [20, 21, 22]]
    plain = build_tree(7, probs, tokens, top_k=(3, 3), node_budget=4)
    free = build_tree(7, probs, tokens, top_k=(3, 3), node_budget=4, free=(10, 20, 30))
    assert [n.token for n in plain.nodes] == [7, 10, 20, 11]
    assert [n.token for n in free.nodes] == [7, 10, 20, 11, 20, 21]  # 10 and 20 below it were free
    grafted = graft_chain(free, [10, 20, 30])
    assert len(grafted) == len(graft_chain(plain, [10, 20, 30])) + 2  # the same chain, two more candidates
