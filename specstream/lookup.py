"""Prompt lookup: drafts copied from earlier text. When the last few tokens already occurred in
the prompt or the reply, the tokens that followed them there are a cheap guess of what comes next
(summaries, quotes and code edits repeat their sources). These drafts join the stream tree and
are verified in the same pass."""

from __future__ import annotations


def lookup_continuation(context: list[int], max_ngram: int, length: int) -> list[int]:
    """The `length` tokens that followed the latest earlier occurrence of the context's last
    n-gram, trying the longest n first; [] when none recurs."""
    return lookup_match(context, max_ngram, length)[0]


def lookup_match(context: list[int], max_ngram: int, length: int) -> tuple[list[int], int]:
    """lookup_continuation, and the length of the n-gram it matched (0: none)."""
    if length <= 0:
        return [], 0
    size = len(context)
    for n in range(min(max_ngram, size - 1), 0, -1):
        suffix = context[size - n :]
        first = suffix[0]
        for start in range(size - n - 1, -1, -1):
            if context[start] == first and context[start : start + n] == suffix:
                return context[start + n : start + n + length], n
    return [], 0
