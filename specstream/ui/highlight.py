"""Reply text as HTML, built from the step records' token ids and texts, never by searching text.

In the Speculative Streaming column every forward pass's tokens share a colour band, the bonus
token (the main stream's own choice after the accepted draft) is underlined, and hovering a
token shows its step, how it was made and its draft probability. Each token carries its step in
`data-step`, which the page's click handler turns into a replay selection.
"""

from __future__ import annotations

import html

from ..records import COPIED_SOURCES, StepRecord

# Pale, distinguishable bands that keep dark text readable; cycled by step.
BANDS = ("#dbeafe", "#dcfce7", "#fef3c7", "#fce7f3", "#e0e7ff", "#ccfbf1")


def visible(text: str) -> str:
    """Token text for labels, with whitespace made visible."""
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or "∅"


# The end-of-sequence token is a control token (`<|im_end|>`), not text: the replies show a mark.
END_MARK = "⏹"


def ends_reply(record: StepRecord, position: int) -> bool:
    """Whether the emitted token at `position` is the end-of-sequence token that ended the run."""
    return record.finish_reason == "eos" and position == len(record.emitted_tokens) - 1


def reply_text(records: list[StepRecord]) -> str:
    """A decoder's whole reply without its end-of-sequence token."""
    return "".join(t for r in records for i, t in enumerate(r.emitted_texts) if not ends_reply(r, i))


def token_roles(record: StepRecord) -> list[tuple[str, float | None, int | None]]:
    """(role, draft probability, rank) of each emitted token of one step, from its accepted path."""
    drafted = [record.nodes[i] for i in record.accepted_path[1:]]
    roles: list[tuple[str, float | None, int | None]] = []
    for position, _ in enumerate(record.emitted_tokens):
        if record.step == 0:
            roles.append(("prefill pass: the main stream's first token", None, None))
        elif position < len(drafted) and drafted[position].source in COPIED_SOURCES:
            roles.append((f"{COPIED_SOURCES[drafted[position].source]}, accepted", None, None))
        elif position < len(drafted):
            node = drafted[position]
            roles.append((f"draft from stream {node.stream}, accepted", node.draft_prob, node.rank))
        else:
            roles.append(("bonus token: the main stream's own choice", None, None))
    return roles


def _token_span(text: str, step: int, title: str, style: str, classes: str) -> str:
    return (
        f'<span class="{classes}" data-step="{step}" title="{html.escape(title, quote=True)}" '
        f'style="{style}">{html.escape(text)}</span>'
    )


def _title(record: StepRecord, text: str, role: str, prob: float | None, rank: int | None) -> str:
    title = f"step {record.step} · {visible(text)!s} · {role}"
    if prob is not None:
        title += f" · draft p={prob:.2f}, rank {rank + 1}"
    return title


def specstream_html(records: list[StepRecord], selected_step: int | None = None) -> str:
    """Speculative Streaming's reply, one colour band per forward pass; the selected step outlined."""
    spans = []
    for record in records:
        band = BANDS[record.step % len(BANDS)]
        roles = token_roles(record)
        for position, text in enumerate(record.emitted_texts):
            role, prob, rank = roles[position]
            classes = "ss-token"
            if ends_reply(record, position):
                text, role = END_MARK, "end of reply (end-of-sequence token); " + role
                classes += " ss-end"
            if record.step > 0 and position == len(record.accepted_path) - 1:
                classes += " ss-bonus"
            if record.step == selected_step:
                classes += " ss-selected"
            spans.append(_token_span(text, record.step, _title(record, text, role, prob, rank),
                                     f"background:{band}", classes))
    return _reply_box("".join(spans))


def plain_html(records: list[StepRecord]) -> str:
    """Plain decoding's reply: one token per pass, so no bands, just the text."""
    return _reply_box("".join(
        f'<span class="ss-end" title="end of reply">{END_MARK}</span>' if ends_reply(r, i) else html.escape(t)
        for r in records for i, t in enumerate(r.emitted_texts)))


def _reply_box(inner: str) -> str:
    return f'<div class="ss-reply">{inner or "<span class=ss-empty>(no tokens yet)</span>"}</div>'
