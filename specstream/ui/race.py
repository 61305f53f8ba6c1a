"""The race: plain decoding against Speculative Streaming on one model, measured fairly.

The two decoders never run at the same time (on one device that would halve both and lie about
both). Instead their passes are interleaved: we always advance the decoder whose own clock (the
sum of its passes' measured seconds) is behind. Each side's clock counts only its own forward
passes, timed inside the decoder after a device sync, so UI work and the other decoder's passes
never count. At any moment both sides stand at about the same race time, so the page shows a live
race that is also an exact one; the finished trace is what the replay reads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

from ..decoding import DecodeSettings, plain_decode, specstream_decode
from ..records import StepRecord
from ..streams import SpeculativeModel
from .highlight import reply_text

METHODS = ("plain", "specstream")
MEASUREMENT_NOTE = (
    "How we measure: the two decoders never run at the same time; their forward passes are interleaved, "
    "always advancing the one whose own clock is behind, and each clock sums only its own passes "
    "(wall time after a device sync; drawing the page is not counted). Greedy, same model, device and dtype."
)


@dataclass
class Side:
    """One decoder's progress in a race."""

    method: str
    records: list[StepRecord] = field(default_factory=list)
    clock: float = 0.0  # seconds of its own forward passes so far
    done: bool = False

    @property
    def tokens(self) -> list[int]:
        return [t for r in self.records for t in r.emitted_tokens]

    @property
    def texts(self) -> list[str]:
        return [t for r in self.records for t in r.emitted_texts]

    def stats(self) -> SideStats:
        passes = len(self.records)
        tokens = len(self.tokens)
        return SideStats(tokens, passes, self.clock, tokens / self.clock if self.clock else 0.0,
                         tokens / passes if passes else 0.0)


@dataclass(frozen=True)
class SideStats:
    tokens: int
    forward_passes: int
    seconds: float
    tokens_per_second: float
    tokens_per_pass: float


@dataclass(frozen=True)
class Divergence:
    position: int  # index of the first differing token in the replies
    plain_text: str
    specstream_text: str


@dataclass
class Trace:
    """A whole race: the settings and both decoders' step records."""

    prompt: str
    settings: DecodeSettings
    depth: int  # the tree depth, which is also the number of streams each node sources
    plain: Side = field(default_factory=lambda: Side("plain"))
    specstream: Side = field(default_factory=lambda: Side("specstream"))
    stopped: bool = False

    @property
    def finished(self) -> bool:
        return self.plain.done and self.specstream.done

    def speedup(self) -> float | None:
        """Tokens per second of Speculative Streaming over plain decoding, so far."""
        plain, spec = self.plain.stats(), self.specstream.stats()
        if not plain.tokens_per_second or not spec.tokens_per_second:
            return None
        return spec.tokens_per_second / plain.tokens_per_second

    def divergence(self) -> Divergence | None:
        """Where the two replies first differ, over the tokens both have made."""
        plain, spec = self.plain.tokens, self.specstream.tokens
        for position, (a, b) in enumerate(zip(plain, spec)):
            if a != b:
                return Divergence(position, self.plain.texts[position], self.specstream.texts[position])
        if self.finished and len(plain) != len(spec):
            shorter = min(len(plain), len(spec))
            texts = (self.plain.texts + ["(end)"])[shorter], (self.specstream.texts + ["(end)"])[shorter]
            return Divergence(shorter, *texts)
        return None

    def steps(self) -> list[StepRecord]:
        """Speculative Streaming's records: the steps the replay walks through."""
        return self.specstream.records

    def to_json(self, model_info: dict | None = None) -> dict:
        plain, spec = self.plain.stats(), self.specstream.stats()
        divergence = self.divergence()
        return {
            "prompt": self.prompt,
            "settings": asdict(self.settings),
            "tree_depth": self.depth,
            "model": model_info or {},
            "plain_text": reply_text(self.plain.records),
            "specstream_text": reply_text(self.specstream.records),
            "identical": divergence is None and self.finished,
            "divergence": asdict(divergence) if divergence else None,
            "speedup": self.speedup(),
            "mean_accepted": spec.tokens_per_pass,
            "stopped": self.stopped,
            "plain": asdict(plain),
            "specstream": asdict(spec),
            "steps": [r.to_json() for r in self.specstream.records],
            "plain_steps": [r.to_json() for r in self.plain.records],
        }


def race(
    model: SpeculativeModel,
    prompt: str,
    prompt_ids: list[int],
    settings: DecodeSettings,
    token_text: Callable[[int], str],
) -> Iterator[Trace]:
    """Run both decoders, interleaved by their own clocks; yields the trace after every pass.

    The caller may stop iterating at any yield (Stop): at most one forward pass runs after it asks.
    Raises ValueError (or SettingsError) before any pass for an empty or too long prompt.
    """
    trace = Trace(prompt, settings, settings.depth(model))
    decoders = {
        "plain": plain_decode(model, prompt_ids, settings, token_text),
        "specstream": specstream_decode(model, prompt_ids, settings, token_text),
    }
    sides = {"plain": trace.plain, "specstream": trace.specstream}
    while not trace.finished:
        behind = min((s for s in sides.values() if not s.done), key=lambda s: s.clock)
        record = next(decoders[behind.method], None)
        if record is None:
            behind.done = True
            continue
        behind.records.append(record)
        behind.clock += record.seconds
        behind.done = record.finish_reason is not None
        yield trace
