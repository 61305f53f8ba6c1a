"""Next-token shares from the text so far: for each 1 to 3 token key in the prompt and the reply,
what followed it there. The phrase table (phrases.py) knows the model's habits across replies;
this knows this conversation's: the names, numbers and phrasing that a reply repeats from its
prompt or from itself. Prompt lookup copies one such continuation as a chain; these shares rank
every tree node's children instead, at any depth below any sibling.

Teacher-forced on the model's greedy replies to the first 40 Spec-Bench prompts (`out/ngram_mix2.py`),
mixing them in at weight 0.3 beside the phrase table's 0.25 raised the top-1 of streams 1 / 2 / 3 from
41.6 / 31.1 / 27.1 % (table alone) to 50.4 / 46.5 / 46.0 %; chosen on held-out self-distilled replies
(54.5 / 37.4 / 31.7 -> 65.2 / 59.4 / 58.3 %)."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

from .phrases import FOLLOWERS, MAX_KEY, longest_ending


class ContextGrams:
    """Counts of what followed each key of up to MAX_KEY tokens in a growing text. The counting waits
    until shares are first asked for: only big trees ask (decoding.CONTEXT_MIN_NODES), and counting a
    2,000-token prompt up front took 10 ms of the first pass."""

    def __init__(self, tokens: Iterable[int] = ()):
        self.tokens: list[int] = list(tokens)
        self.counts: dict[tuple[int, ...], Counter] = defaultdict(Counter)
        self.counted = 0  # the tokens counted so far as followers of their keys

    def extend(self, tokens: Iterable[int]) -> None:
        self.tokens.extend(tokens)

    def _count_new(self) -> None:
        for end in range(self.counted, len(self.tokens)):
            for n in range(1, min(MAX_KEY, end) + 1):
                self.counts[tuple(self.tokens[end - n : end])][self.tokens[end]] += 1
        self.counted = len(self.tokens)

    def next_tokens(self, context: Sequence[int]) -> dict[int, float]:
        """What followed the longest key that ends `context` earlier in the text: {token: share} of
        its FOLLOWERS likeliest; empty if no ending occurred before."""
        self._count_new()
        found, _ = longest_ending(self.counts, context, MAX_KEY)
        if not found:
            return {}
        total = sum(found.values())
        return {token: count / total for token, count in found.most_common(FOLLOWERS)}
