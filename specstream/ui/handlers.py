"""What the app does with a visitor's input: check it, run the race, serve the /compare API.

Errors a visitor can cause become `gr.Error` with a sentence they understand.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import gradio as gr

from ..decoding import DecodeSettings, SettingsError
from .race import Trace, race
from .service import ModelService

MAX_PROMPT_CHARS = 8000  # tokenizing a pasted book would stall the queue before the context check
MAX_NEW_TOKENS = 512  # a demo run on a CPU; the library allows more
LOCK_TIMEOUT = 300.0  # seconds to wait for the device before telling the visitor it is busy
DEFAULT_TOP_K_TEXT = ", ".join(str(k) for k in DecodeSettings.top_k)


@dataclass
class Session:
    """One browser session's run: its trace and its Stop flag (checked before every forward pass)."""

    trace: Trace | None = None
    stop: threading.Event = field(default_factory=threading.Event)


def parse_top_k(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in str(text).replace(",", " ").split())
    except ValueError:
        raise gr.Error(f"Top-k per depth must be whole numbers separated by commas, like 4, 3, 2 (not '{text}').")
    if not values:
        raise gr.Error("Top-k per depth needs at least one number, like 4, 3, 2.")
    return values


def make_settings(max_new_tokens, gamma, top_k_text, node_budget, prune_threshold, lookup_tokens=DecodeSettings.lookup_tokens,
                  auto_tree=True) -> DecodeSettings:
    """The visitor's settings as a DecodeSettings, or a gr.Error saying what is out of bounds."""
    try:
        numbers = dict(max_new_tokens=int(max_new_tokens), node_budget=int(node_budget),
                       prune_threshold=float(prune_threshold), gamma=None if gamma is None else int(gamma),
                       lookup_tokens=int(lookup_tokens))
    except (TypeError, ValueError, OverflowError):
        raise gr.Error("Every setting must be a number.")
    if numbers["max_new_tokens"] > MAX_NEW_TOKENS:
        raise gr.Error(f"This demo makes at most {MAX_NEW_TOKENS} new tokens per run, not {numbers['max_new_tokens']}.")
    try:
        return DecodeSettings(top_k=parse_top_k(top_k_text), tree="auto" if auto_tree else "fixed", **numbers).validate()
    except SettingsError as error:
        raise gr.Error(f"Please adjust the settings: {error}.")


def ready_model(service: ModelService, timeout: float = LOCK_TIMEOUT):
    """The loaded model, once loading ends, or a gr.Error saying why there is none."""
    if not service.wait(timeout):
        raise gr.Error("The model is still loading; please try again in a moment.")
    if not service.ready:
        raise gr.Error(service.error or "The model is not available.")
    return service.model, service.base


def check_prompt(prompt: str) -> str:
    """The prompt, stripped, or a gr.Error if it is empty or too long (no model needed)."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise gr.Error("Please type a prompt first (or pick one of the examples).")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise gr.Error(f"The prompt is {len(prompt)} characters long; this demo takes at most {MAX_PROMPT_CHARS}.")
    return prompt


def check_request(prompt: str, *settings_values) -> None:
    """What can be checked before a run touches the page: the prompt's text and the settings. Run as
    its own event with no outputs, so a visitor's mistake shows one message, not an error badge on
    every output of the last run."""
    check_prompt(prompt)
    make_settings(*settings_values)


def prompt_ids(service: ModelService, prompt: str, settings: DecodeSettings) -> list[int]:
    """The chat-formatted prompt, checked against the context, or a gr.Error."""
    prompt = check_prompt(prompt)
    model, base = ready_model(service)
    try:
        settings.validate(model)
    except SettingsError as error:
        raise gr.Error(f"Please adjust the settings: {error}.")
    ids = base.chat_prompt(prompt)
    context = model.shape.max_positions
    if len(ids) + settings.max_new_tokens > context:
        raise gr.Error(f"The prompt is {len(ids)} tokens long; with {settings.max_new_tokens} new tokens that is "
                       f"more than the model's context of {context} tokens. Please shorten it.")
    return ids


def acquire_device(service: ModelService) -> None:
    if not service.device_lock.acquire(timeout=LOCK_TIMEOUT):
        raise gr.Error("The model is busy with another run; please try again in a minute.")


def compare(service: ModelService, prompt: str, max_new_tokens: int = 64) -> dict:
    """The whole race in one call, for scripts: the trace's JSON (texts, speedup, every step record)."""
    settings = make_settings(max_new_tokens, None, DEFAULT_TOP_K_TEXT, DecodeSettings.node_budget,
                             DecodeSettings.prune_threshold)
    ids = prompt_ids(service, prompt, settings)
    acquire_device(service)
    try:
        trace = None
        for trace in race(service.model, prompt, ids, settings, service.base.token_text):
            pass
    finally:
        service.device_lock.release()
    return trace.to_json(service.info())
