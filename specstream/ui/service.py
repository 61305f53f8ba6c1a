"""The one model of an app process: loaded once, in a background thread, so the page opens at once.

Which model and adapter load is set by arguments or environment variables (so tests can start the
app on a tiny model): SPECSTREAM_MODEL (default: the shipped SmolLM2-135M-Instruct; a checkpoint
folder or a hub id), SPECSTREAM_ADAPTER ("default", "fresh" or a folder), SPECSTREAM_DEVICE and
SPECSTREAM_DTYPE (float32 by default, also on a GPU: in bfloat16 the two columns part at logit ties,
which bfloat16 spaces 0.125 apart near 20; 1 of 12 H200 benchmark replies matched).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from ..adapter import AdapterError
from ..decoding import DecodeSettings
from ..engine import build_model, default_adapter_path, fresh_adapter
from ..loading import BaseModel, ModelLoadError, load_base_model
from ..streams import SpeculativeModel
from .race import race

WARMUP_PROMPT = "Hi"


@dataclass(frozen=True)
class ModelChoice:
    model: str | None = None
    adapter: str = "default"
    device: str = "auto"
    dtype: str = "float32"

    @classmethod
    def from_environment(cls) -> ModelChoice:
        env = os.environ.get
        return cls(env("SPECSTREAM_MODEL") or None, env("SPECSTREAM_ADAPTER", "default"),
                   env("SPECSTREAM_DEVICE", "auto"), env("SPECSTREAM_DTYPE", "float32"))


class ModelService:
    """Holds the model and a lock that lets only one decode use the device at a time."""

    def __init__(self, choice: ModelChoice):
        self.choice = choice
        self.base: BaseModel | None = None
        self.model: SpeculativeModel | None = None
        self.error: str | None = None  # why the model could not load, in a sentence
        self.adapter_note = ""  # what the adapter is, or why the asked-for one was not used
        self.load_seconds: float | None = None
        self.device_lock = threading.Lock()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._load, name="specstream-model-loader", daemon=True)

    def start(self) -> ModelService:
        self._thread.start()
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """True once loading has ended (well or not)."""
        return self._ready.wait(timeout)

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.model is not None

    def _load(self) -> None:
        started = time.perf_counter()
        try:
            self.base = load_base_model(self.choice.model, device=self.choice.device, dtype=self.choice.dtype)
            self.model = self._build(self.base)
            self._warm_up()
        except (ModelLoadError, OSError, ValueError) as error:
            self.error = f"The model could not be loaded: {error}."
        except Exception as error:  # a crash in a background thread would leave the page loading forever
            self.error = f"The model could not be loaded ({type(error).__name__}: {error})."
        finally:
            self.load_seconds = time.perf_counter() - started
            self._ready.set()

    def _build(self, base: BaseModel) -> SpeculativeModel:
        asked = self.choice.adapter
        try:
            model = build_model(base, asked)
        except (AdapterError, OSError, ValueError) as error:
            self.adapter_note = f"The adapter '{asked}' failed to load ({error}); using an untrained one instead."
            return build_model(base, fresh_adapter(base))
        trained = asked not in ("default", "fresh") or (asked == "default" and default_adapter_path(base) is not None)
        if not trained:
            self.adapter_note = ("The stream adapter is untrained (no trained adapter is shipped yet), so drafts "
                                 "are almost never accepted and Speculative Streaming cannot be faster.")
        return model

    def _warm_up(self) -> None:
        """One short race, so the first visitor's timings do not include one-off start-up costs."""
        ids = self.base.chat_prompt(WARMUP_PROMPT)
        for _ in race(self.model, WARMUP_PROMPT, ids, DecodeSettings(max_new_tokens=4), self.base.token_text):
            pass

    def info(self) -> dict:
        """What is loaded, for the page and the JSON export."""
        if not self.ready:
            return {"status": "failed" if self.error else "loading", "error": self.error}
        config = self.model.adapter.config
        return {
            "status": "ready", "model": self.base.name, "weights": self.base.description,
            "device": str(self.base.device), "dtype": str(self.base.dtype).removeprefix("torch."),
            "matmul": self.base.weights.matmul,
            "adapter_mode": config.mode, "gamma": config.gamma, "stream_layers": config.stream_layers,
            "bonus_rank": config.bonus_rank, "adapter_note": self.adapter_note, "load_seconds": round(self.load_seconds or 0, 2),
        }
