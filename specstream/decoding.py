"""Greedy decoders as generators of step records: `plain` (one token per pass, the baseline) and
`specstream` (draft tree, one-pass verification and speculation).

Each pass is timed from its start to the moment its tokens and the next draft are known, after a
device sync; building the record (token texts) happens after the clock stops.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .autotree import PRIOR_LOOKUP, AcceptanceStats, CopiedStats, CopyKind, PassTimes, Plan, TreePlanner
from .context_grams import ContextGrams
from .costs import PassCosts, device_costs
from .records import NodeRecord, StepRecord
from .streams import SpeculativeModel
from .lookup import lookup_match
from .phrases import MAX_KEY
from .tree import (DraftTree, Fate, Followers, accept_longest_path, build_tree, graft_chain, likely_ends, node_fates,
                   prune_by_score, tree_attention_mask)

TokenText = Callable[[int], str]
MAX_NODE_BUDGET = 256  # beyond this a pass costs more than it can win on any device we target
MAX_LOOKUP_TOKENS = 16  # a copied branch longer than this is almost never accepted to its end
STREAM_PASSES = ("auto", "joint", "deferred", "likely")
# With stream_pass "likely", a node carries streams when the accepted path ends there with at least
# this chance. A node's streams cost its gamma rows through the top layers (about 0.3 ms a row on a
# 2-core Xeon); a pass that ends at a node without them costs a second pass (about 5 ms).
LIKELY_END = 0.1
# The text's own shares rank what prompt lookup's chain already copies, so they only add where a
# tree has room beyond it. On 16 Spec-Bench prompts: tau 2.39 -> 2.36 with 8 nodes, 2.63 -> 2.64
# with 24 (fixed trees), 2.68 -> 2.76 with the flat GPU-like costs' trees of up to 128.
CONTEXT_MIN_NODES = 32
# Whether the auto tree corrects its pass-cost tables by the passes it times (autotree.PassTimes).
CORRECT_COSTS = True


class SettingsError(ValueError):
    """Decode settings out of bounds, with a message a visitor understands."""


@dataclass(frozen=True)
class DecodeSettings:
    max_new_tokens: int = 128  # the Spec-Bench figures in DESIGN.md use 128
    # Candidates per depth, wider near the root where acceptance is likeliest, and the most nodes (root
    # included) a tree may have; with the auto tree each pass drafts what the measured pass costs favour,
    # so these caps only bind where nodes are nearly free (a GPU). There, on 16 Spec-Bench prompts with
    # flat pass costs, (6, 4, 3) and 48 nodes gave tau 2.39; (12, 8, 6) and 128 nodes with 16 copied
    # tokens 2.54. On the 2-core Xeon the wider caps drafted the same trees (tau 2.03-2.12 vs 2.03-2.04,
    # 58-72 vs 56-75 tokens/s in six alternating processes).
    top_k: tuple[int, ...] = (12, 8, 6, 4)
    node_budget: int = 128
    prune_threshold: float = 0.0  # drop subtrees whose early-exit transition probability is below this; 0 = off
    gamma: int | None = None  # tree depth; None = every stream of the adapter
    # A branch of up to this many tokens copied from earlier text (prompt lookup); 0 = off. With
    # the auto tree, the most it may copy: each pass keeps the positions whose measured acceptance
    # pays for their nodes. On 8 hand-written prompts it lifted tokens/s by 4 to 12 % (tau 1.41 -> 1.58).
    lookup_tokens: int = 16
    lookup_ngram: int = 3  # longest n-gram matched for prompt lookup, as in transformers' prompt lookup
    # The copied branch comes from the adapter's phrase table instead where the table knows a
    # longer ending of the text than prompt lookup matched (no effect without a table).
    phrases: bool = True
    # Each tree node's children ranked by (1 - this) * the stream's probability + this * the phrase
    # table's share of that token after the text up to the node (phrases.py: streams 1 / 2 / 3 top-1
    # 38.7 / 21.1 / 13.2 % -> 42.1 / 30.1 / 26.3 % on Spec-Bench replies); 0 = the streams alone.
    phrase_mix: float = 0.35
    # And + this * the share of that token after the same text earlier in the prompt and reply, in
    # trees of at least CONTEXT_MIN_NODES nodes (context_grams.py: with phrase_mix 0.25, streams
    # 1 / 2 / 3 top-1 41.6 / 31.1 / 27.1 % -> 50.4 / 46.5 / 46.0 % on Spec-Bench replies); 0 = off.
    context_mix: float = 0.3
    # "joint": every tree node carries its streams through the top layers (the paper's single
    # pass). "deferred": only the deepest accepted node's streams, in a short second pass over the
    # top layers (same drafts, fewer rows, one more pass). "likely": streams only at the nodes where
    # the accepted path is likely to end (the root, and any node with a chance of at least
    # LIKELY_END), the second pass only when it ends elsewhere. Same drafts in every mode. "auto" is
    # likely on a CPU and joint on a GPU (see likely_streams). On 16 Spec-Bench prompts on a 2-core
    # Xeon (interleaved, four runs) likely was 0-3 % faster than joint, with 2-3 stream sources a
    # pass instead of 4-9 and a second pass in 8-24 % of passes; on 8 prompts 4 % slower: within
    # this shared machine's noise, with fewer rows computed.
    stream_pass: str = "auto"
    # "auto": each pass drafts the node budget (at most `node_budget`, shaped by `top_k`) that the
    # measured pass costs and the acceptance seen so far say is fastest; "fixed": always `node_budget`.
    tree: str = "auto"
    stop_at_eos: bool = True

    def validate(self, model: SpeculativeModel | None = None) -> DecodeSettings:
        problems = []
        if not 1 <= self.max_new_tokens <= 4096:
            problems.append(f"max new tokens must be 1 to 4096, not {self.max_new_tokens}")
        if not self.top_k or any(not 1 <= k <= 64 for k in self.top_k):
            problems.append(f"top-k per depth must be 1 to 64 at every depth, not {list(self.top_k)}")
        if not 1 <= self.node_budget <= MAX_NODE_BUDGET:
            problems.append(f"node budget must be 1 to {MAX_NODE_BUDGET}, not {self.node_budget}")
        if not 0 <= self.lookup_tokens <= MAX_LOOKUP_TOKENS or not 1 <= self.lookup_ngram <= 8:
            problems.append(f"prompt lookup takes 0 to {MAX_LOOKUP_TOKENS} tokens and n-grams of 1 to 8 tokens")
        if self.tree not in ("auto", "fixed"):
            problems.append(f"tree must be auto or fixed, not '{self.tree}'")
        if self.stream_pass not in STREAM_PASSES:
            problems.append(f"stream pass must be one of {', '.join(STREAM_PASSES)}, not '{self.stream_pass}'")
        if not (0.0 <= self.phrase_mix <= 1.0 and 0.0 <= self.context_mix <= 1.0
                and self.phrase_mix + self.context_mix <= 1.0):
            problems.append(f"phrase and context mix must be 0 to 1 and together at most 1, not {self.phrase_mix} "
                            f"and {self.context_mix}")
        if not 0.0 <= self.prune_threshold < 1.0:
            problems.append(f"pruning threshold must be at least 0 and below 1, not {self.prune_threshold}")
        streams = model.gamma if model else 8
        if self.gamma is not None and not 1 <= self.gamma <= streams:
            problems.append(f"gamma must be 1 to {streams} (the adapter's streams), not {self.gamma}")
        if problems:
            raise SettingsError("; ".join(problems))
        return self

    def deferred_streams(self, model: SpeculativeModel) -> bool:
        """Whether streams wait for the second pass: "deferred", or any mode with an adapter whose
        streams read the bonus token, which exists only after verification."""
        return self.stream_pass == "deferred" or model.streams_need_bonus

    def likely_streams(self, device: torch.device) -> bool:
        """Whether streams are computed only where the path is likely to end (unless deferred):
        "likely", or "auto" on a CPU. On a GPU the stream rows of a joint pass cost next to nothing
        and a second pass costs a whole round of kernel launches, so "auto" is joint there."""
        return self.stream_pass == "likely" or (self.stream_pass == "auto" and device.type == "cpu")

    def depth(self, model: SpeculativeModel) -> int:
        return min(model.gamma if self.gamma is None else self.gamma, len(self.top_k))


@dataclass
class _Run:
    """Mutable bookkeeping of one decode, kept out of the records."""

    max_new_tokens: int
    eos_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    passes: int = 0

    def emit(self, candidates: list[int]) -> tuple[list[int], str | None]:
        """Append candidates up to the limit or end-of-sequence; returns them and why we stop."""
        emitted: list[int] = []
        for token in candidates:
            emitted.append(token)
            if token in self.eos_ids:
                self.tokens += emitted
                return emitted, "eos"
            if len(self.tokens) + len(emitted) >= self.max_new_tokens:
                self.tokens += emitted
                return emitted, "length"
        self.tokens += emitted
        return emitted, None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _start(model: SpeculativeModel, prompt_ids: list[int], settings: DecodeSettings, scratch_rows: int):
    settings.validate(model)
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    context = model.shape.max_positions
    if len(prompt_ids) + settings.max_new_tokens > context:
        raise ValueError(
            f"the prompt has {len(prompt_ids)} tokens; with {settings.max_new_tokens} new tokens that exceeds "
            f"the model's context of {context} tokens"
        )
    cache = model.new_cache(len(prompt_ids) + settings.max_new_tokens + scratch_rows)
    eos = frozenset(model.shape.eos_token_ids) if settings.stop_at_eos else frozenset()
    return cache, _Run(settings.max_new_tokens, eos)


def _prefill(model: SpeculativeModel, cache, prompt_ids: list[int], streams: bool, gamma: int | None = None):
    device = model.weights.device
    tokens = torch.tensor(prompt_ids, device=device)
    positions = torch.arange(len(prompt_ids), device=device)
    causal = torch.ones(len(prompt_ids), len(prompt_ids), dtype=torch.bool, device=device).tril()
    out = model.forward(cache, tokens, positions, causal, stream_sources="last" if streams else None, gamma=gamma)
    cache.advance(len(prompt_ids))
    first = model.greedy(out.main_hidden[-1:])[0]
    return first, out


def _record(method, run, step, seconds, emitted, reason, token_text, nodes=(), path=(), bonus=None, plan=None,
            copied: CopyKind | None = None, result: _TreePass | None = None) -> StepRecord:
    return StepRecord(
        method=method,
        step=step,
        nodes=tuple(nodes),
        accepted_path=tuple(path),
        bonus_token=emitted[-1] if bonus is None else bonus,
        emitted_tokens=tuple(emitted),
        emitted_texts=tuple(token_text(t) for t in emitted),
        seconds=seconds,
        total_tokens=len(run.tokens),
        forward_passes=run.passes,
        finish_reason=reason,
        expected_tokens_per_pass=plan.expected_tokens_per_pass if plan else None,
        expected_speedup=plan.expected_speedup if plan else None,
        copied_source=copied[0] if copied else None,
        copied_key=copied[1] if copied else 0,
        stream_nodes=tuple(result.stream_nodes) if result else (),
        stream_depth=len(result.stream_hidden) if result else 0,
        second_pass=result.second_pass if result else False,
    )


def plain_decode(
    model: SpeculativeModel, prompt_ids: list[int], settings: DecodeSettings, token_text: TokenText = str
) -> Iterator[StepRecord]:
    """Greedy decoding, one token per forward pass, with the KV cache."""
    cache, run = _start(model, prompt_ids, settings, scratch_rows=1)
    device = model.weights.device
    started = time.perf_counter()
    token, _ = _prefill(model, cache, prompt_ids, streams=False)
    one = torch.ones(1, 1, dtype=torch.bool, device=device)
    step = 0
    while True:
        emitted, reason = run.emit([token])
        run.passes += 1
        _sync(device)
        seconds = time.perf_counter() - started
        root = (NodeRecord(0, token, token_text(token), -1, 0, 0, 1.0, 0, None, Fate.ACCEPTED, None, None, "root"),)
        yield _record("plain", run, step, seconds, emitted, reason, token_text, nodes=root if step else (), path=(0,) if step else ())
        if reason:
            return
        started = time.perf_counter()
        step += 1
        position = torch.tensor([cache.length], device=device)
        out = model.forward(cache, torch.tensor([token], device=device), position, one)
        cache.advance(1)
        token = model.greedy(out.main_hidden[:1])[0]


def _next_draft(
    model, stream_hidden: torch.Tensor, grams: ContextGrams, settings: DecodeSettings, depth: int,
    planner: TreePlanner | None,
) -> tuple[DraftTree, CopyKind | None]:
    """stream_hidden (gamma, d) of the deepest accepted node -> the best tree of top-k tokens per
    depth below the last token of the text so far, plus a copied branch; sizes from the auto tree's plan,
    else from the settings. Also the kind of copied chain the text offered, if any."""
    context = grams.tokens  # the prompt and the reply so far
    plan = planner.plan if planner else None
    budget = plan.node_budget if plan else settings.node_budget
    depth = min(_planned_depth(plan, depth), len(stream_hidden))
    top_probs, top_tokens = model.draft_topk(stream_hidden[:depth], max(settings.top_k[:depth]))
    offered, kind = _copied_chain(model, context, settings, settings.lookup_tokens)
    chain = offered[: planner.chain_length(kind)] if offered and planner else offered
    tree = build_tree(context[-1], top_probs.tolist(), top_tokens.tolist(), settings.top_k[:depth], budget,
                      _followers(model, grams, settings, budget), tuple(context[-MAX_KEY:-1]), chain)
    if not offered:
        return tree, None
    return graft_chain(tree, chain, kind[0]), kind


def _followers(model, grams: ContextGrams, settings: DecodeSettings, budget: int) -> list[tuple[float, Followers]]:
    """The sources that rank the streams' candidates in a tree of `budget` nodes, with their weights."""
    sources: list[tuple[float, Followers]] = []
    if settings.phrases and model.phrases and settings.phrase_mix > 0:
        sources.append((settings.phrase_mix, model.phrases.next_tokens))
    if settings.context_mix > 0 and budget >= CONTEXT_MIN_NODES:
        sources.append((settings.context_mix, grams.next_tokens))
    return sources


def _copied_chain(model, context: list[int], settings: DecodeSettings, length: int) -> tuple[list[int], CopyKind]:
    """Prompt lookup's continuation, or the phrase table's where its key is the longer match: a
    longer shared ending is the better predictor of what follows (measured offline). An empty chain
    with prompt lookup off (`length` 0)."""
    if length <= 0:
        return [], ("lookup", 0)
    copied, matched = lookup_match(context, settings.lookup_ngram, length)
    table = model.phrases if settings.phrases else None
    if table is not None:
        phrase, key = table.continuation(context, length)
        if key > matched:
            return phrase, ("phrase", key)
    return copied, ("lookup", matched)


def specstream_decode(
    model: SpeculativeModel, prompt_ids: list[int], settings: DecodeSettings, token_text: TokenText = str
) -> Iterator[StepRecord]:
    """Speculative Streaming: each pass verifies the last draft and makes the next one."""
    if model.adapter is None:
        raise ValueError("Speculative Streaming needs a stream adapter")
    depth = settings.validate(model).depth(model)
    scratch = (settings.node_budget + settings.lookup_tokens) * (1 + depth) + depth + 1
    cache, run = _start(model, prompt_ids, settings, scratch_rows=scratch)
    device = model.weights.device
    planner = tree_planner(model, settings, depth) if settings.tree == "auto" else None
    plan = planner.plan if planner else None
    started = time.perf_counter()
    first, out = _prefill(model, cache, prompt_ids, streams=not model.streams_need_bonus, gamma=depth)
    streams = out.stream_hidden[0] if out.stream_hidden is not None else \
        model.streams_at_end(cache, out.early_hidden[-1], depth, bonus=first)
    grams = ContextGrams([*prompt_ids, first])
    tree, kind = _next_draft(model, streams, grams, settings, depth, planner)
    emitted, reason = run.emit([first])
    run.passes += 1
    _sync(device)
    yield _record("specstream", run, 0, time.perf_counter() - started, emitted, reason, token_text)
    step = 0
    while not reason:
        step += 1
        started = time.perf_counter()
        # The streams this pass computes draft the next tree: as many as the current plan wants.
        sources = _stream_sources(tree, settings, model, planner, kind)
        pass_result = _tree_pass(model, cache, tree, settings, _planned_depth(plan, depth), sources)
        emitted, reason = run.emit(pass_result.candidates)
        run.passes += 1
        tree_done, plan_done, kind_done = tree, plan, kind
        if not reason:
            plan = planner.plan if planner else None
            grams.extend(emitted)
            tree, kind = _next_draft(model, pass_result.stream_hidden, grams, settings, depth, planner)
        _sync(device)
        seconds = time.perf_counter() - started
        nodes = _node_records(tree_done, pass_result, token_text)
        record = _record("specstream", run, step, seconds, emitted, reason, token_text, nodes, pass_result.path,
                         pass_result.candidates[-1], plan_done, kind_done, pass_result)
        if planner:
            planner.observe(record)
        yield record


def _stream_sources(tree: DraftTree, settings: DecodeSettings, model: SpeculativeModel, planner: TreePlanner | None,
                    kind: CopyKind | None) -> str | list[int] | None:
    """Where the tree pass computes streams, as `SpeculativeModel.forward` takes it: nowhere
    (deferred), at every node (joint), or at the nodes where the accepted path likely ends. There a
    drafted token's chance is its stream's own probability (it knows this context; the auto tree's
    rates per depth and rank only know the average: with them, 16 prompts ran 2 % slower), a copied
    token's its kind's acceptance rate so far."""
    if settings.deferred_streams(model):
        return None
    if not settings.likely_streams(model.weights.device):
        return "all"
    chances = [1.0]
    for node in tree.nodes[1:]:
        if node.source == "stream":
            rate = node.draft_prob
        else:
            rate = planner.copied_rate(kind, node.depth) if planner and kind else PRIOR_LOOKUP
        chances.append(chances[node.parent] * rate)
    return likely_ends(tree.parents, chances, LIKELY_END)


def _planned_depth(plan: Plan | None, depth: int) -> int:
    """The streams per node the auto tree's plan drafts, else the settings' depth."""
    return plan.depth if plan and plan.depth else depth


_shared_stats: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def planning_costs(model: SpeculativeModel, settings: DecodeSettings, depth: int) -> dict[int, PassCosts]:
    """This device's pass costs for every stream depth the auto tree may choose, up to `depth`."""
    deferred = settings.deferred_streams(model)
    likely = not deferred and settings.likely_streams(model.weights.device)
    return {d: device_costs(model, deferred, d, likely) for d in range(1, depth + 1)}


def tree_planner(model: SpeculativeModel, settings: DecodeSettings, depth: int) -> TreePlanner:
    """The auto tree's planner for one run: this device's pass costs (measured once, before any
    pass is timed) and the acceptance statistics of the model's earlier runs."""
    top_k = settings.top_k[:depth]
    costs = planning_costs(model, settings, depth)
    shared = _shared_stats.setdefault(model, {})
    stats = shared.setdefault((depth, max(top_k)), AcceptanceStats(depth, max(top_k)))
    copied = shared.setdefault("copied", CopiedStats(MAX_LOOKUP_TOKENS)) if settings.lookup_tokens else None
    times = shared.setdefault(("times", settings.stream_pass), PassTimes()) if CORRECT_COSTS else None
    return TreePlanner(top_k, settings.node_budget, stats, costs, copied, settings.lookup_tokens, times)


@dataclass
class _TreePass:
    path: list[int]
    candidates: list[int]  # accepted drafted tokens, then the bonus token
    kept: list[bool]
    choice: list[int | None]  # main stream's token at each node; None where verification never needed it
    scores: list[float] | None
    stream_hidden: torch.Tensor  # (gamma, d) at the deepest accepted node
    stream_nodes: list[int]  # the nodes whose streams the tree pass computed
    second_pass: bool  # whether the deepest accepted node's streams took a second, short pass


def _tree_pass(
    model: SpeculativeModel, cache, tree: DraftTree, settings: DecodeSettings, depth: int, sources: str | list[int] | None,
) -> _TreePass:
    """Run the tree in one forward pass, verify it, and keep the accepted path in the cache.
    `sources`: where the pass computes streams (see `_stream_sources`); where the path ends without
    them, a short second pass computes that node's."""
    device = model.weights.device
    parents, tokens = tree.parents, tree.tokens
    scores: list[float] | None = None

    def select_rows(early_hidden: torch.Tensor) -> list[int]:
        nonlocal scores
        scores = model.transition_scores(early_hidden, tokens, parents)
        keep = prune_by_score(parents, scores, settings.prune_threshold)
        return [i for i, k in enumerate(keep) if k]

    out = model.forward(
        cache,
        torch.tensor(tokens, device=device),
        torch.tensor(tree.depths, device=device) + cache.length,
        tree_attention_mask(parents, device),
        stream_sources=sources,
        select_rows=select_rows if settings.prune_threshold > 0 and len(tree) > 1 else None,
        gamma=depth,
    )
    kept = [False] * len(tree)
    for node in out.kept:
        kept[node] = True
    choice = _LazyChoices(model, out)
    path = accept_longest_path(parents, tokens, kept, choice.__getitem__)
    cache.keep(path)
    deepest = path[-1]
    streams = out.streams_of(deepest)
    second_pass = streams is None
    if second_pass:
        streams = model.streams_at_end(cache, out.early_hidden[deepest], depth, bonus=choice[deepest])
    candidates = [tokens[i] for i in path[1:]] + [choice[deepest]]
    return _TreePass(path, candidates, kept, choice.known(len(tree)), scores, streams, out.stream_nodes, second_pass)


class _LazyChoices:
    """The main stream's greedy token at each kept tree node: all at once, or one row when first
    asked for where the model verifies row by row (see `SpeculativeModel.verifies_row_by_row`)."""

    def __init__(self, model: SpeculativeModel, out):
        self.model, self.hidden = model, out.main_hidden
        self.row_of = {node: row for row, node in enumerate(out.kept)}
        self.choices: dict[int, int] = {}
        if not model.verifies_row_by_row:
            self.choices = dict(zip(out.kept, model.greedy(self.hidden)))

    def __getitem__(self, node: int) -> int:
        if node not in self.choices:
            self.choices[node] = self.model.greedy(self.hidden[self.row_of[node]][None])[0]
        return self.choices[node]

    def known(self, size: int) -> list[int | None]:
        return [self.choices.get(node) for node in range(size)]


def _node_records(tree: DraftTree, result: _TreePass, token_text: TokenText) -> list[NodeRecord]:
    fates = node_fates(tree.parents, result.kept, result.path)
    records = []
    for i, node in enumerate(tree.nodes):
        choice = result.choice[i]
        records.append(
            NodeRecord(
                index=i,
                token_id=node.token,
                text=token_text(node.token),
                parent=node.parent,
                depth=node.depth,
                stream=node.depth if node.source == "stream" else 0,
                draft_prob=node.draft_prob,
                rank=node.rank,
                prune_score=None if result.scores is None else result.scores[i],
                fate=fates[i],
                main_choice=choice,
                main_choice_text=None if choice is None else token_text(choice),
                source=node.source,
            )
        )
    return records


DECODERS = {"plain": plain_decode, "specstream": specstream_decode}
