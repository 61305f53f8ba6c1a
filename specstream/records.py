"""One immutable record per forward pass: the single source of truth for the app, the benchmark,
the JSON export and the tests. Nobody re-derives acceptance from text."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .tree import Fate


@dataclass(frozen=True)
class NodeRecord:
    index: int
    token_id: int
    text: str
    parent: int  # -1 for the root
    depth: int
    stream: int  # the speculative stream that proposed it; 0 for the root
    draft_prob: float
    rank: int  # 0 for the stream's top choice
    prune_score: float | None  # the early-exit estimate of p(token | parent); None when not computed
    fate: Fate
    main_choice: int | None  # the main stream's greedy token after this node; None where verification did not need it
    main_choice_text: str | None
    # "root", "stream" (proposed by stream `stream`), "lookup" (copied from earlier text) or
    # "phrase" (the model's own frequent continuation, from the phrase table)
    source: str = "stream"


# Where a node that no stream proposed came from, in words.
COPIED_SOURCES = {
    "lookup": "copied from earlier text (prompt lookup)",
    "phrase": "a frequent phrase of the model (phrase table)",
}


@dataclass(frozen=True)
class StepRecord:
    method: str  # "plain" or "specstream"
    step: int  # 0 is the prefill pass over the prompt
    nodes: tuple[NodeRecord, ...]  # empty for the prefill pass
    accepted_path: tuple[int, ...]  # node indices, root first
    bonus_token: int  # the main stream's token at the deepest accepted node
    emitted_tokens: tuple[int, ...]  # this pass's new tokens, cut at end-of-sequence or the limit
    emitted_texts: tuple[str, ...]
    seconds: float  # wall time of the pass, measured after a device sync
    total_tokens: int
    forward_passes: int
    finish_reason: str | None  # "eos", "length" or None while decoding goes on
    # The auto tree's forecast for this pass's tree (None for plain decoding and fixed trees):
    # tokens per pass and speedup over plain decoding, from measured pass costs and acceptance so far.
    expected_tokens_per_pass: float | None = None
    expected_speedup: float | None = None
    # Where this pass's copied branch came from ("lookup" or "phrase") and how many tokens of the
    # text's ending it matched (0: none matched); the chain may still be empty where the auto tree
    # judged this kind of chain not worth a node.
    copied_source: str | None = None
    copied_key: int = 0
    # The tree nodes whose speculative streams this pass computed (`stream_depth` each), and whether
    # the accepted path ended elsewhere, so that a short second pass computed that node's streams.
    stream_nodes: tuple[int, ...] = ()
    stream_depth: int = 0
    second_pass: bool = False

    @property
    def tokens_per_pass(self) -> float:
        return self.total_tokens / self.forward_passes

    @property
    def accepted_length(self) -> int:
        """Drafted tokens accepted in this pass (the bonus token not counted)."""
        return max(len(self.accepted_path) - 1, 0)

    def to_json(self) -> dict:
        data = asdict(self)
        data["tokens_per_pass"] = self.tokens_per_pass
        for node in data["nodes"]:
            node["fate"] = node["fate"].value
        return data
