"""Training checkpoints without pickles: adapter and optimizer tensors in safetensors, the rest
(step, optimizer hyper-parameters) in JSON. Written to a temporary folder and renamed, so a
crash mid-write never leaves a half checkpoint behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..adapter import StreamAdapter, load_adapter, save_adapter

STATE_FILE = "optimizer.safetensors"
PROGRESS_FILE = "progress.json"


def save_checkpoint(folder: Path, adapter: StreamAdapter, optimizer: torch.optim.Optimizer, step: int) -> None:
    folder = Path(folder)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    save_adapter(adapter, staging)
    state = optimizer.state_dict()
    tensors = {"rng": torch.get_rng_state()}
    scalars = {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{key}"] = float(value)
    save_file(tensors, str(staging / STATE_FILE))
    groups = [{k: v for k, v in g.items()} for g in state["param_groups"]]
    (staging / PROGRESS_FILE).write_text(json.dumps({"step": step, "scalars": scalars, "param_groups": groups}))
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def load_checkpoint(folder: Path, adapter: StreamAdapter, optimizer: torch.optim.Optimizer, shape, identity) -> int:
    """Restore adapter weights, optimizer state and RNG; returns the step to continue from."""
    folder = Path(folder)
    saved = load_adapter(folder, shape, identity)
    if saved.config != adapter.config:
        raise ValueError(f"the checkpoint in {folder} was made with other adapter settings: {saved.config}")
    with torch.no_grad():
        adapter.load_state_dict(saved.state_dict())
    progress = json.loads((folder / PROGRESS_FILE).read_text())
    tensors = load_file(str(folder / STATE_FILE))
    torch.set_rng_state(tensors.pop("rng"))
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    for name, value in progress["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = torch.tensor(value)
    optimizer.load_state_dict({"state": state, "param_groups": progress["param_groups"]})
    return int(progress["step"])
