"""Self-distillation data: prompts the model writes itself, and its own greedy replies.

Acceptance depends on predicting what *this* model will say, so the streams learn from its own
greedy output. Prompts are sampled from the model's chat template with the user turn left open
(Magpie-style), each started by one of a few seed openings so that the mix covers the kinds of
requests people send (code, lists, summaries, explanations, chat). No benchmark prompt is ever
read here: only prompt files the user names, and we refuse any file under a `spec_bench` folder.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from .loading import BaseModel, load_reference_model

SEED_OPENINGS = (
    "", "", "", "", "Write a Python function that", "Write a short story about", "Explain", "Explain how",
    "Summarize the following text:\n", "Summarize this article in three sentences:\n", "What is", "How do I",
    "List", "Give me a list of", "Compare", "Translate the following sentence into French:", "Write an email",
    "Solve", "Write a poem about", "Describe", "What are the benefits of", "Why does", "Can you help me",
    "Rewrite this paragraph", "Answer the question using the passage below.\n", "Write a SQL query",
    "Classify", "Extract the names from this text:", "Give step-by-step instructions for", "Imagine you are",
    "What is the difference between", "Write a JavaScript function", "Calculate", "Suggest",
)


@dataclass(frozen=True)
class Sample:
    prompt: str
    prompt_ids: tuple[int, ...]
    reply_ids: tuple[int, ...]


def refuse_benchmark(path: Path) -> None:
    if "spec_bench" in Path(path).resolve().parts:
        raise ValueError(f"{path} is benchmark data; training on it would make every figure meaningless")


def read_prompt_file(path: Path) -> list[str]:
    """One prompt per line of a .txt file, or Spec-Bench-style JSONL (`turns[0]`) or {"prompt": ...}."""
    refuse_benchmark(path)
    prompts = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        if Path(path).suffix == ".jsonl":
            try:
                record = json.loads(line)
                prompts.append(record["turns"][0] if "turns" in record else record["prompt"])
            except (json.JSONDecodeError, KeyError, IndexError, TypeError):
                raise ValueError(f"{path}:{number} is not a JSON object with 'turns' or 'prompt'") from None
        else:
            prompts.append(line.strip())
    return prompts


def _template_prefix(base: BaseModel) -> str:
    """The chat template up to the start of the user's text."""
    marker = "\x00USER\x00"
    text = base.tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    return text[: text.index(marker)]


def _batches(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _generate(model, tokenizer, texts: list[str], max_new_tokens: int, sample: bool) -> list[list[int]]:
    encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    options = dict(do_sample=True, temperature=0.9, top_p=0.95) if sample else dict(do_sample=False)
    with torch.inference_mode():
        out = model.generate(**encoded, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **options)
    new = out[:, encoded["input_ids"].shape[1] :].tolist()
    eos = tokenizer.eos_token_id
    return [row[: row.index(eos) + 1] if eos in row else row for row in new]


def sample_prompts(base: BaseModel, model, count: int, seed: int, batch_size: int,
                   deadline: float | None = None) -> list[str]:
    """Magpie-style: let the model write the user's turn from each seed opening. Past `deadline`
    (time.monotonic) no new batch starts: a time-boxed run keeps what it has."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    prefix = _template_prefix(base)
    openings = [rng.choice(SEED_OPENINGS) for _ in range(count)]
    prompts: list[str] = []
    for batch in tqdm(list(_batches(openings, batch_size)), desc="sampling prompts"):
        if deadline is not None and prompts and time.monotonic() > deadline:
            print(f"time limit: {len(prompts)} of {count} prompts sampled", file=sys.stderr)
            break
        for opening, ids in zip(batch, _generate(model, base.tokenizer, [prefix + o for o in batch], 96, sample=True)):
            text = (opening + base.tokenizer.decode(ids, skip_special_tokens=True)).strip()
            if len(text) >= 12:
                prompts.append(text)
    return prompts


def greedy_replies(base: BaseModel, model, prompts: list[str], max_new_tokens: int, batch_size: int) -> list[Sample]:
    samples = []
    ordered = sorted(prompts, key=len)  # similar lengths per batch waste less padding
    for batch in tqdm(list(_batches(ordered, batch_size)), desc="greedy replies"):
        prompt_ids = [base.chat_prompt(p) for p in batch]
        texts = [base.tokenizer.decode(ids) for ids in prompt_ids]
        for prompt, ids, reply in zip(batch, prompt_ids, _generate(model, base.tokenizer, texts, max_new_tokens, sample=False)):
            samples.append(Sample(prompt, tuple(ids), tuple(reply)))
    return samples


def build_dataset(
    base: BaseModel,
    folder: Path,
    *,
    count: int,
    prompt_files: tuple[Path, ...] = (),
    max_new_tokens: int = 192,
    seed: int = 0,
    batch_size: int = 48,
    dtype: torch.dtype | None = None,
    prompt_deadline: float | None = None,
) -> list[Sample]:
    """Make (or read back) the self-distillation set in `folder`/samples.jsonl."""
    path = Path(folder) / "samples.jsonl"
    if path.is_file():
        return load_samples(path)
    model = load_reference_model(base)
    if dtype is not None:
        model = model.to(dtype)  # bf16 halves generation time on CPUs with bf16 matmuls
    base.tokenizer.padding_side = "left"
    if base.tokenizer.pad_token is None:  # transformers 5's GGUF tokenizer has none; padding is masked anyway
        base.tokenizer.pad_token = base.tokenizer.eos_token
    prompts = sample_prompts(base, model, count, seed, batch_size, prompt_deadline)
    for file in prompt_files:
        prompts += read_prompt_file(file)
    # Sampled prompts repeat (30 of 3072 on one run): a repeat could land in both the training and
    # the held-out split and flatter the held-out accuracy.
    prompts = list(dict.fromkeys(prompts))
    samples = greedy_replies(base, model, prompts, max_new_tokens, batch_size)
    Path(folder).mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    partial.write_text("".join(json.dumps(s.__dict__) + "\n" for s in samples))
    partial.rename(path)
    return samples


def load_samples(path: Path) -> list[Sample]:
    samples = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        try:
            data = json.loads(line)
            samples.append(Sample(data["prompt"], tuple(data["prompt_ids"]), tuple(data["reply_ids"])))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{number} is not a valid sample line; delete the file to rebuild it") from None
    return samples
