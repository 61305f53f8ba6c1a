"""Adapter files: a round trip, and a clear error for each way a file can be wrong."""

import json

import pytest
import torch

from specstream.adapter import AdapterError, load_adapter, save_adapter
from specstream.adapter import BaseIdentity
from safetensors.torch import load_file, save_file

from .conftest import random_adapter


@pytest.mark.parametrize("bonus_rank", [0, 4])
def test_round_trip(tiny_base, tmp_path, bonus_rank):
    adapter = random_adapter(tiny_base, 0, bonus_rank=bonus_rank)
    save_adapter(adapter, tmp_path / "a")
    loaded = load_adapter(tmp_path / "a", tiny_base.weights.shape, tiny_base.identity)
    assert loaded.config == adapter.config and loaded.config.bonus_rank == bonus_rank
    assert ("bonus_up" in dict(loaded.named_parameters())) == bool(bonus_rank)
    for (name, p), (_, q) in zip(adapter.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p.float(), q), name
    # The weights file itself is accepted as the path too.
    load_adapter(tmp_path / "a" / "adapter.safetensors", tiny_base.weights.shape, tiny_base.identity)


def saved(tiny_base, tmp_path):
    return save_adapter(random_adapter(tiny_base, 0), tmp_path / "a")


def load(tiny_base, folder):
    return load_adapter(folder, tiny_base.weights.shape, tiny_base.identity)


def test_missing_folder_and_files(tiny_base, tmp_path):
    with pytest.raises(AdapterError, match="does not exist"):
        load(tiny_base, tmp_path / "nowhere")
    folder = saved(tiny_base, tmp_path)
    (folder / "adapter.safetensors").unlink()
    with pytest.raises(AdapterError, match="weights .* are missing"):
        load(tiny_base, folder)
    (folder / "adapter.json").unlink()
    with pytest.raises(AdapterError, match="config .* is missing"):
        load(tiny_base, folder)


def test_truncated_weights(tiny_base, tmp_path):
    folder = saved(tiny_base, tmp_path)
    data = (folder / "adapter.safetensors").read_bytes()
    (folder / "adapter.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        load(tiny_base, folder)


def test_pickle_is_never_loaded(tiny_base, tmp_path):
    folder = saved(tiny_base, tmp_path)
    torch.save({"stream_embeddings": torch.zeros(3, 64)}, folder / "adapter.safetensors")
    with pytest.raises(AdapterError, match="truncated or corrupt"):
        load(tiny_base, folder)


def test_wrong_base_model(tiny_base, tmp_path):
    folder = saved(tiny_base, tmp_path)
    other = BaseIdentity("other", 30, 576, 49152, "0123")
    with pytest.raises(AdapterError, match="trained for 'tiny.*' .* but the loaded model is 'other'"):
        load_adapter(folder, tiny_base.weights.shape, other)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.update(gamma=0), "gamma must be 1 to 8"),
        (lambda c: c.update(mode="turbo"), "mode must be one of"),
        (lambda c: c.update(stream_layers=99), "stream_layers must be"),
        (lambda c: c.update(colour="red"), "unknown fields"),
        (lambda c: c.pop("base"), "incomplete or malformed"),
        (lambda c: c.update(gamma=2), "has shape"),
    ],
)
def test_wrong_config(tiny_base, tmp_path, change, message):
    folder = saved(tiny_base, tmp_path)
    config = json.loads((folder / "adapter.json").read_text())
    change(config)
    (folder / "adapter.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=message):
        load(tiny_base, folder)


def test_config_that_is_not_json(tiny_base, tmp_path):
    folder = saved(tiny_base, tmp_path)
    (folder / "adapter.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load(tiny_base, folder)


def test_draft_vocabulary_round_trip_and_bad_ids(tiny_base, tmp_path):
    adapter = random_adapter(tiny_base, 0, draft_vocab_size=8)
    adapter.draft_vocab.copy_(torch.tensor([2, 3, 5, 7, 11, 13, 17, 19]))
    folder = save_adapter(adapter, tmp_path / "a")
    loaded = load(tiny_base, folder)
    assert loaded.draft_ids.tolist() == [2, 3, 5, 7, 11, 13, 17, 19] and loaded.draft_ids.dtype == torch.long
    tensors = load_file(str(folder / "adapter.safetensors"))
    for bad in ([2, 2, 5, 7, 11, 13, 17, 19], [2, 3, 5, 7, 11, 13, 17, 10**6], [-1, 3, 5, 7, 11, 13, 17, 19]):
        tensors["draft_vocab"] = torch.tensor(bad)
        save_file(tensors, str(folder / "adapter.safetensors"))
        with pytest.raises(AdapterError, match="distinct token ids below"):
            load(tiny_base, folder)
