"""A phrase table: the model's own frequent continuations, as a cheap draft source beside the
streams (in the spirit of REST's datastore). Built from the self-distilled greedy replies, it
maps the last 1 to 3 tokens to the 8 tokens that most often followed them there; since decoding
is greedy, the model tends to say the same phrase again ("Here's a step-by-step ...").

Stored beside the adapter as `phrases.safetensors`: per key length n, `keys_n` (K, n) and
`continuations_n` (K, length) int32, padded with -1. Offline, on 150 held-out replies, drafting
from the table where its key is longer than the prompt-lookup match raised the accepted copied
tokens per position from 1.61 to 1.83.

The same replies give each key's next-token shares (`next_tokens`): a stream drafts from its own
context only, blind to the tokens between it and the position it predicts (the bonus token, the
draft parents), while the table knows what the model said after those tokens. Mixed into the
ranking of each tree node's children, on the model's greedy replies to Spec-Bench prompts
(teacher-forced, `out/ngram_mix.py`), the top-1 of streams 1 / 2 / 3 went from 38.7 / 21.1 / 13.2 %
to 42.1 / 30.1 / 26.3 % at weight 0.35 (chosen on held-out self-distilled replies: 51.6 / 29.7 / 17.8
-> 54.5 / 37.4 / 31.7 %)."""

from __future__ import annotations

import argparse
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .adapter import AdapterError

V = TypeVar("V")
PHRASES_FILE = "phrases.safetensors"
MAX_KEY = 3
LENGTH = 8
MIN_COUNT = 2  # a continuation seen once is one reply's text, not a habit of the model
FOLLOWERS = 8  # next tokens kept per key, the likeliest: a node's children are at most 12
# The most-seen keys kept, so that more training data cannot push the adapter folder past its 20 MB
# (3,072 replies gave 26,074 phrases and 82,981 keys with followers: 3.4 MB in all).
MAX_PHRASES, MAX_FOLLOWER_KEYS = 60_000, 100_000


class PhraseError(AdapterError):
    pass


class PhraseTable:
    def __init__(self, table: dict[tuple[int, ...], list[int]],
                 followers: dict[tuple[int, ...], dict[int, float]] | None = None):
        self.table = table
        self.followers = followers or {}  # key -> {next token: its share of what followed the key}
        self.max_key = max((len(k) for k in table), default=0)

    def __len__(self) -> int:
        return len(self.table)

    def continuation(self, context: list[int], length: int) -> tuple[list[int], int]:
        """The stored continuation of the longest key that ends the context, and that key's length."""
        found, n = longest_ending(self.table, context, self.max_key)
        return (found[:length], n) if found else ([], 0)

    def next_tokens(self, context: Sequence[int]) -> dict[int, float]:
        """What the model said next after the longest key that ends `context`: {token: share}
        (the likeliest FOLLOWERS; keys seen at least MIN_COUNT times); empty if no key matches."""
        return longest_ending(self.followers, context, MAX_KEY)[0] or {}

    @classmethod
    def build(cls, replies: Iterable[list[int]], min_count: int = MIN_COUNT) -> PhraseTable:
        counts: dict[tuple[int, ...], Counter] = defaultdict(Counter)
        nexts: dict[tuple[int, ...], Counter] = defaultdict(Counter)
        for reply in replies:
            for i in range(1, len(reply)):
                for n in range(1, min(MAX_KEY, i) + 1):
                    key = tuple(reply[i - n : i])
                    counts[key][tuple(reply[i : i + LENGTH])] += 1
                    nexts[key][reply[i]] += 1
        seen = {key: sum(after.values()) for key, after in nexts.items()}  # how often each key occurred
        best = {key: after.most_common(1)[0] for key, after in counts.items()}
        habits = [key for key, (_, count) in best.items() if count >= min_count]
        table = {key: list(best[key][0]) for key in _most_seen(habits, seen, MAX_PHRASES)}
        known = [key for key, total in seen.items() if total >= min_count]
        followers = {key: {token: count / seen[key] for token, count in nexts[key].most_common(FOLLOWERS)}
                     for key in _most_seen(known, seen, MAX_FOLLOWER_KEYS)}
        return cls(table, followers)

    def save(self, folder: str | Path) -> Path:
        tensors = {}
        for n in range(1, MAX_KEY + 1):
            rows = [(k, v) for k, v in self.table.items() if len(k) == n]
            keys = torch.tensor([k for k, _ in rows], dtype=torch.int32).reshape(len(rows), n)
            padded = [v + [-1] * (LENGTH - len(v)) for _, v in rows]
            tensors[f"keys_{n}"] = keys
            tensors[f"continuations_{n}"] = torch.tensor(padded, dtype=torch.int32).reshape(len(rows), LENGTH)
            tensors.update(_packed_followers(self.followers, n))
        path = Path(folder) / PHRASES_FILE
        save_file(tensors, str(path))
        return path

    @classmethod
    def load(cls, folder: str | Path, vocab_size: int) -> PhraseTable | None:
        """The table in an adapter folder; None when it has none."""
        path = Path(folder) / PHRASES_FILE
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
            table = {}
            for n in range(1, MAX_KEY + 1):
                keys, continuations = tensors[f"keys_{n}"], tensors[f"continuations_{n}"]
                if keys.shape[0] != continuations.shape[0] or (keys.numel() and keys.shape[1] != n):
                    raise KeyError
                for key, continuation in zip(keys.tolist(), continuations.tolist()):
                    table[tuple(key)] = [t for t in continuation if t >= 0]
            followers = _unpacked_followers(tensors)
        except (SafetensorError, KeyError, OSError, RuntimeError, ValueError):
            raise PhraseError(f"{path} is not a phrase table; delete it or rebuild it with "
                              "python -m specstream.phrases") from None
        if any(t >= vocab_size or t < 0 for key in table for t in key) or any(
                t >= vocab_size or t < 0 for shares in followers.values() for t in shares):
            raise PhraseError(f"{path} holds token ids outside this model's vocabulary ({vocab_size})")
        return cls(table, followers)


def longest_ending(keyed: Mapping[tuple[int, ...], V], context: Sequence[int], max_key: int) -> tuple[V | None, int]:
    """The non-empty value of the longest key (of at most `max_key` tokens) that ends `context`, and
    that key's length; (None, 0) if none does."""
    for n in range(min(max_key, len(context)), 0, -1):
        found = keyed.get(tuple(context[-n:]))
        if found:
            return found, n
    return None, 0


def _most_seen(keys: list[tuple[int, ...]], seen: dict[tuple[int, ...], int], limit: int) -> list[tuple[int, ...]]:
    """The `limit` keys seen most often (first seen first among equals), in first-seen order."""
    if len(keys) <= limit:
        return keys
    kept = set(sorted(keys, key=lambda key: -seen[key])[:limit])  # a stable sort keeps ties in order
    return [key for key in keys if key in kept]


def _packed_followers(followers: dict[tuple[int, ...], dict[int, float]], n: int) -> dict[str, torch.Tensor]:
    """The followers of n-token keys as flat tensors: keys (K, n), how many followers each (K,),
    then all followers' tokens and shares in key order (float16: shares only rank drafts)."""
    rows = [(k, v) for k, v in followers.items() if len(k) == n]
    return {
        f"follower_keys_{n}": torch.tensor([k for k, _ in rows], dtype=torch.int32).reshape(len(rows), n),
        f"follower_counts_{n}": torch.tensor([len(v) for _, v in rows], dtype=torch.int32),
        f"follower_tokens_{n}": torch.tensor([t for _, v in rows for t in v], dtype=torch.int32),
        f"follower_shares_{n}": torch.tensor([p for _, v in rows for p in v.values()], dtype=torch.float16),
    }


def _unpacked_followers(tensors: dict[str, torch.Tensor]) -> dict[tuple[int, ...], dict[int, float]]:
    """`_packed_followers` undone; {} for a table saved before followers existed."""
    followers: dict[tuple[int, ...], dict[int, float]] = {}
    for n in range(1, MAX_KEY + 1):
        if f"follower_keys_{n}" not in tensors:
            continue
        keys, counts = tensors[f"follower_keys_{n}"].tolist(), tensors[f"follower_counts_{n}"].tolist()
        tokens, shares = tensors[f"follower_tokens_{n}"].tolist(), tensors[f"follower_shares_{n}"].float().tolist()
        if len(keys) != len(counts) or sum(counts) != len(tokens) or len(tokens) != len(shares):
            raise ValueError("inconsistent followers")
        start = 0
        for key, count in zip(keys, counts):
            followers[tuple(key)] = dict(zip(tokens[start : start + count], shares[start : start + count]))
            start += count
    return followers


def main(argv: list[str] | None = None) -> None:
    from .selfdistill import load_samples

    parser = argparse.ArgumentParser(prog="python -m specstream.phrases",
                                     description="Build an adapter folder's phrase table from self-distilled samples.")
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with the training samples.jsonl")
    parser.add_argument("--out", type=Path, required=True, help="the adapter folder")
    parser.add_argument("--min-count", type=int, default=MIN_COUNT)
    args = parser.parse_args(argv)
    samples = load_samples(args.data_dir / "samples.jsonl")
    table = PhraseTable.build((list(s.reply_ids) for s in samples), args.min_count)
    print(f"{len(table)} phrases from {len(samples)} replies -> {table.save(args.out)}")


if __name__ == "__main__":
    main()
