"""Fixtures: a tiny random Llama checkpoint (with a word-level tokenizer and a chat template) made
on the fly, so the fast tests need no download and run in seconds on a CPU."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from specstream.adapter import AdapterConfig, StreamAdapter
from specstream.loading import BaseModel, load_base_model
from specstream.streams import SpeculativeModel

TINY_VOCAB = 24  # small, so random drafts are often accepted and every code path gets exercised
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tiny_checkpoint(
    folder: Path, *, seed: int = 0, model_type: str = "llama", vocab: int = TINY_VOCAB, rope: dict | None = None
) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    words = specials + [f"w{i}" for i in range(vocab - len(specials))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="<|end|>",
        additional_special_tokens=specials[3:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, initializer_range=0.2,
        rope_parameters=rope or {"rope_type": "default", "rope_theta": 10000.0},
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if model_type != "llama":
        text = (folder / "config.json").read_text().replace('"model_type": "llama"', f'"model_type": "{model_type}"')
        (folder / "config.json").write_text(text)
    return folder


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_base(tiny_dir) -> BaseModel:
    # float64 keeps near-ties from flipping greedy choices between differently batched passes.
    return load_base_model(str(tiny_dir), device="cpu", dtype="float64")


def random_adapter(base: BaseModel, seed: int, **settings) -> StreamAdapter:
    """An adapter with every weight random (not the zero-initialised no-op a fresh one is)."""
    torch.manual_seed(seed)
    config = AdapterConfig(base=base.identity, **({"gamma": 3, "stream_layers": 2, "lora_rank": 4} | settings))
    adapter = StreamAdapter(config, base.weights.shape)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.normal_(0, 0.3)
    return adapter


def with_eos(model: SpeculativeModel, eos: int | None) -> SpeculativeModel:
    """The same model with another end-of-sequence token."""
    weights = dataclasses.replace(model.weights)
    weights.shape = dataclasses.replace(weights.shape, eos_token_ids=() if eos is None else (eos,))
    return SpeculativeModel(weights, model.adapter)
