"""Putting a base model and a stream adapter together into the model the decoders run."""

from __future__ import annotations

from pathlib import Path

from .adapter import AdapterConfig, StreamAdapter, adapter_folder, load_adapter
from .loading import BaseModel
from .phrases import PhraseTable
from .streams import SpeculativeModel

ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_ADAPTER = ASSETS / "adapter"


def fresh_adapter(base: BaseModel, **settings) -> StreamAdapter:
    """An untrained adapter: its streams predict nothing useful, but decoding stays correct."""
    return StreamAdapter(AdapterConfig(base=base.identity, **settings), base.weights.shape)


def default_adapter_path(base: BaseModel) -> Path | None:
    """The adapter shipped in assets/, when it was trained for this base model."""
    config = DEFAULT_ADAPTER / "adapter.json"
    return DEFAULT_ADAPTER if config.is_file() and base.name in config.read_text() else None


def build_model(base: BaseModel, adapter: str | Path | StreamAdapter | None = "default") -> SpeculativeModel:
    """adapter: "default" (shipped, else fresh), "fresh", a path, an adapter, or None (plain only).
    An adapter folder's phrase table, where it has one, comes with it."""
    if adapter == "default":
        adapter = default_adapter_path(base) or "fresh"
    if adapter == "fresh":
        return SpeculativeModel(base.weights, fresh_adapter(base))
    if isinstance(adapter, (str, Path)):
        loaded = load_adapter(adapter, base.weights.shape, base.identity)
        return SpeculativeModel(base.weights, loaded, PhraseTable.load(adapter_folder(adapter), base.weights.shape.vocab_size))
    return SpeculativeModel(base.weights, adapter)
