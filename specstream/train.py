"""Fit a stream adapter to a base model: `python -m specstream.train --out assets/adapter`.

Runs on `accelerate`: the same command on a CPU, one GPU, or several through `accelerate launch`
(each process precomputes and trains on its own shard; gradients are averaged).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from .adapter import AdapterConfig, AdapterError, StreamAdapter, load_adapter, save_adapter
from .loading import ModelLoadError, cache_root, load_base_model
from .draft_vocab import frequency_ranked
from .phrases import PHRASES_FILE, PhraseTable
from .selfdistill import Sample, build_dataset, refuse_benchmark
from .training.checkpoint import load_checkpoint, save_checkpoint
from .training.features import Features, Sequence, main_stream_features, to_sequences
from .training.objective import StreamObjective


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 2
    batch_size: int = 8  # sequences per step; about 2,500 tokens
    learning_rate: float = 5e-4  # the paper's
    warmup_steps: int = 20
    max_length: int = 320  # prompt tail plus reply
    clip_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 50
    eval_fraction: float = 0.05  # held out to measure per-stream top-1 accuracy


def learning_rate(step: int, total: int, settings: TrainSettings) -> float:
    """Linear warm-up, then linear decay to zero (the paper's linear schedule)."""
    warm = min(1.0, (step + 1) / max(settings.warmup_steps, 1))
    return settings.learning_rate * warm * max(0.0, 1.0 - step / max(total, 1))


def fitted_total(planned: int, done: int, seconds_per_step: float, seconds_left: float) -> int:
    """The schedule's length when the run has a wall-clock budget: as many steps as the time left
    holds at the measured rate, never more than planned. The learning rate then decays to zero at
    the budget's end rather than being cut off mid-schedule."""
    if seconds_per_step <= 0:
        return planned
    return max(done + 1, min(planned, done + int(seconds_left / seconds_per_step)))


def batches_for_epoch(count: int, batch_size: int, seed: int, epoch: int, lengths: list[int]) -> list[list[int]]:
    """Length-bucketed batches (less padding) in an order fixed by seed and epoch, so a resumed
    run sees exactly the batches an unbroken one would."""
    rng = random.Random(seed * 1000 + epoch)
    order = sorted(range(count), key=lambda i: (lengths[i], rng.random()))
    batches = [order[i : i + batch_size] for i in range(0, count, batch_size)]
    rng.shuffle(batches)
    return batches


def precompute(weights, sequences: list[Sequence], first_layer: int, keep_kv: bool, batch_size: int, store_dtype,
               desc: str, compute_dtype=None) -> list[Features]:
    """The fixed main-stream features of every batch, computed in `compute_dtype` (default: the
    storage dtype; bf16 is 3x faster on CPUs with bf16 matmuls, and these features only seed the
    streams) and stored in `store_dtype`."""
    compute_dtype = compute_dtype or store_dtype
    weights = weights.cast(compute_dtype) if weights.dtype != compute_dtype else weights
    lengths = [len(s.tokens) for s in sequences]
    features = []
    for batch in tqdm(batches_for_epoch(len(sequences), batch_size, 0, -1, lengths), desc=desc, file=sys.stderr):
        features.append(main_stream_features(weights, [sequences[i] for i in batch], first_layer, keep_kv, store_dtype))
    return features


def hidden_rms(features: list[Features]) -> float:
    """The typical RMS of a real (unpadded) hidden state at the first stream layer."""
    values = []
    for batch in features[:16]:
        rows = torch.arange(batch.tokens.shape[1])[None, :] < batch.lengths[:, None]
        values.append(batch.early_hidden[rows].float().pow(2).mean(-1).sqrt().median())
    return round(float(torch.stack(values).median()), 3)


def check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise SystemExit(f"error: cannot write to {folder} ({error.strerror})") from None


def evaluate(objective: StreamObjective, features: list[Features]) -> dict[str, float]:
    totals: dict[str, float] = {}
    with torch.no_grad():
        for batch in features:
            _, metrics = objective(batch)
            for key, value in metrics.items():
                totals[key] = totals.get(key, 0.0) + value / len(features)
    return {key: round(value, 4) for key, value in totals.items()}


def train(args: argparse.Namespace) -> dict:
    from accelerate import Accelerator

    settings = TrainSettings(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                             max_length=args.max_length, seed=args.seed, checkpoint_every=args.checkpoint_every)
    check_writable(args.out)
    deadline = time.monotonic() + args.time_limit if args.time_limit else None
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.device == "cpu")
    torch.manual_seed(settings.seed)
    base = load_base_model(args.model, device=str(accelerator.device), dtype="float32")
    start_from = _starting_adapter(args, base)
    # read before the hours of training, so that a corrupt table fails now
    kept_phrases = PhraseTable.load(args.init_adapter, base.weights.shape.vocab_size) if args.keep_phrases else None
    samples = build_dataset(base, args.data_dir, count=args.samples, prompt_files=tuple(args.prompt_file),
                            max_new_tokens=args.reply_tokens, seed=settings.seed, batch_size=args.generation_batch,
                            dtype=getattr(torch, args.generation_dtype),
                            prompt_deadline=_share_of(deadline, args.time_limit, PROMPT_SHARE))
    sequences = to_sequences(samples, settings.max_length)
    random.Random(settings.seed).shuffle(sequences)  # the data file is sorted by prompt length
    sequences = sequences[: args.limit_sequences or None]
    held_out = max(1, int(len(sequences) * settings.eval_fraction))
    train_part = sequences[held_out:][accelerator.process_index :: accelerator.num_processes]
    compute = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float32
    store = compute if args.feature_dtype == "auto" else getattr(torch, args.feature_dtype)
    first_layer = base.weights.shape.num_layers - args.stream_layers
    keep_kv = args.mode == "lossless"
    eval_features = precompute(base.weights, sequences[:held_out], first_layer, keep_kv, settings.batch_size, store, "eval features", compute)
    features = precompute(base.weights, train_part, first_layer, keep_kv, settings.batch_size, store, "train features", compute)
    adapter = (start_from or _new_adapter(args, base, features, train_part)).to(accelerator.device)
    objective = StreamObjective(adapter, base.weights)
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=settings.learning_rate, weight_decay=0.0)
    start = 0
    if args.resume and (args.out / "checkpoint").is_dir():
        start = load_checkpoint(args.out / "checkpoint", adapter, optimizer, base.weights.shape, base.identity)
    model, optimizer = accelerator.prepare(objective, optimizer)
    result = run_steps(accelerator, model, optimizer, features, settings, start, args, deadline, len(eval_features))
    result["eval"] = evaluate(objective, eval_features)
    if accelerator.is_main_process:
        finish(args, adapter, result, settings, samples, sequences, kept_phrases)
    return result


def _draft_size(requested: int, vocab_size: int) -> int:
    """The draft vocabulary an adapter records for --draft-vocab: 0 for the whole vocabulary."""
    return requested if 0 < requested < vocab_size else 0


def _new_adapter(args, base, features: list[Features], train_part: list[Sequence]) -> StreamAdapter:
    vocab_size = base.weights.shape.vocab_size
    draft_size = _draft_size(args.draft_vocab, vocab_size)
    config = AdapterConfig(base=base.identity, gamma=args.gamma, stream_layers=args.stream_layers,
                           lora_rank=args.lora_rank, lora_alpha=float(args.lora_rank), mode=args.mode,
                           stream_scale=hidden_rms(features), draft_vocab_size=draft_size, bonus_rank=args.bonus_rank)
    adapter = StreamAdapter(config, base.weights.shape)
    if draft_size:
        adapter.draft_vocab.copy_(frequency_ranked((s.tokens for s in train_part), draft_size, vocab_size))
    return adapter


# The adapter's shape flags: left out, they take these values, or an --init-adapter's own.
SHAPE_DEFAULTS = {"mode": "lossless", "gamma": 3, "stream_layers": 4, "lora_rank": 32, "draft_vocab": 16384}


def _starting_adapter(args, base) -> StreamAdapter | None:
    """The adapter of --init-adapter, to train on from its weights (more data for an adapter that
    cost a GPU lease to make); its shape, stream scale and draft vocabulary carry over unchanged."""
    if args.init_adapter is None:
        return None
    adapter = load_adapter(args.init_adapter, base.weights.shape, base.identity)
    config = adapter.config
    for name in SHAPE_DEFAULTS:
        given, held = getattr(args, name), getattr(config, name if name != "draft_vocab" else "draft_vocab_size")
        wanted = given
        if name == "draft_vocab" and given is not None:
            wanted = _draft_size(given, base.weights.shape.vocab_size)
        if given is not None and wanted != held:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} {given} differs from the --init-adapter's {held}: leave {flag} out or match it")
        setattr(args, name, held)
    return _with_bonus_map(adapter, args, base.weights.shape)


def _with_bonus_map(adapter: StreamAdapter, args, shape) -> StreamAdapter:
    """The --init-adapter as --bonus-rank asks: unchanged, or given a bonus map that starts as a
    no-op (so training starts from the adapter's streams exactly); a map it has cannot change rank."""
    held = adapter.config.bonus_rank
    if args.bonus_rank is None or args.bonus_rank == held:
        args.bonus_rank = held
        return adapter
    if held:
        raise ValueError(f"--bonus-rank {args.bonus_rank} differs from the --init-adapter's {held}: leave it out or match it")
    extended = StreamAdapter(replace(adapter.config, bonus_rank=args.bonus_rank), shape)
    extended.load_state_dict(adapter.state_dict(), strict=False)
    return extended


def _share_of(deadline: float | None, limit: float, share: float) -> float | None:
    """A point `share` of the way into the budget that ends at `deadline`."""
    return None if deadline is None else deadline - limit * (1 - share)


def run_steps(accelerator, model, optimizer, features, settings: TrainSettings, start: int, args,
              deadline: float | None = None, eval_batches: int = 0) -> dict:
    per_epoch = len(features)
    total = planned = per_epoch * settings.epochs
    lengths = [int(f.lengths.sum()) for f in features]
    progress = tqdm(total=total, initial=start, desc="training", file=sys.stderr, disable=not accelerator.is_main_process)
    started, tokens_seen, metrics = time.perf_counter(), 0, {}
    for step in range(start, total):
        epoch, index = divmod(step, per_epoch)
        batch = features[batches_for_epoch(per_epoch, 1, settings.seed, epoch, lengths)[index][0]]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total, settings)
        with accelerator.autocast():
            loss, metrics = model(batch)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), settings.clip_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += int(batch.lengths.sum())
        if step + 1 - start == WARMUP_STEPS:
            warm = (step + 1, time.perf_counter())
        if deadline is not None and (step + 1 - start == TIMING_STEPS or (step + 1 - start) % REFIT_EVERY == 0):
            total = _fit_to_deadline(planned, step + 1, warm, deadline, eval_batches, progress)
            if accelerator.num_processes > 1:  # every process must run the same number of steps
                total = int(accelerator.gather(torch.tensor([total], device=accelerator.device)).min())
        progress.update(1)
        progress.set_postfix(loss=f"{metrics['loss']:.3f}", s1=f"{metrics.get('stream1_top1', 0):.2f}",
                             tok_s=f"{tokens_seen / (time.perf_counter() - started):.0f}")
        if accelerator.is_main_process and (step + 1) % settings.checkpoint_every == 0:
            save_checkpoint(args.out / "checkpoint", accelerator.unwrap_model(model).adapter, optimizer, step + 1)
        if args.stop_after and step + 1 - start >= args.stop_after:
            break
        if step + 1 >= total:
            break
    progress.close()
    seconds = time.perf_counter() - started
    return {"steps": total, "planned_steps": planned, "steps_run": step + 1 - start, "train_tokens_per_epoch": sum(lengths),
            "seconds": round(seconds, 1), "last_batch": {k: round(v, 4) for k, v in metrics.items()},
            "device": str(accelerator.device), "processes": accelerator.num_processes,
            "mixed_precision": args.mixed_precision, "feature_dtype": args.feature_dtype}


# A run with a deadline times its steps after the first WARMUP_STEPS: on an H200 a fit that counted the
# first steps' set-up cut a 276-step schedule to 54. The first epoch still runs slower than the rest
# (~6 steps/s against 25-30 there: every batch shape is new), so it refits every REFIT_EVERY steps.
WARMUP_STEPS, TIMING_STEPS, REFIT_EVERY = 3, 12, 200
FINISH_SECONDS = 30  # writing the adapter and the phrase table, with room to spare
# Prompt sampling stops at this share of the budget; greedy replies then take about 1.3x as long
# (H200, batches of 1024: 8 s of prompts, 10 s of replies), leaving ~40 % for features and training.
PROMPT_SHARE = 0.25


def _fit_to_deadline(planned: int, done: int, warm: tuple[int, float], deadline: float, eval_batches: int,
                     progress) -> int:
    per_step = (time.perf_counter() - warm[1]) / (done - warm[0])
    # evaluation is a forward pass only, about a third of a training step per batch: priced at half, to spare
    left = deadline - time.monotonic() - eval_batches * per_step / 2 - FINISH_SECONDS
    total = fitted_total(planned, done, per_step, left)
    if total < planned:
        print(f"time limit: {total} of {planned} planned steps fit ({per_step:.3f} s a step)", file=sys.stderr)
        progress.total = total
    return total


def finish(args, adapter: StreamAdapter, result: dict, settings: TrainSettings, samples: list[Sample], sequences,
           kept_phrases: PhraseTable | None) -> None:
    phrases = kept_phrases if kept_phrases is not None else PhraseTable.build(list(s.reply_ids) for s in samples)
    phrases.save(args.out)
    result |= {"settings": asdict(settings), "samples": len(samples), "sequences": len(sequences), "phrases": len(phrases),
               "tokens": sum(len(s.tokens) for s in sequences), "command": "python -m specstream.train " + " ".join(sys.argv[1:])}
    save_adapter(adapter, args.out, extra_metadata={k: result[k] for k in ("command", "samples", "tokens", "steps")})
    (args.out / "training_metrics.json").write_text(json.dumps(result, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m specstream.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="adapter folder to write")
    p.add_argument("--model", default=None, help="checkpoint folder or hub id; default: SmolLM2-135M-Instruct")
    p.add_argument("--mode", choices=("lossless", "shared"), default=None, help=f"default {SHAPE_DEFAULTS['mode']}")
    p.add_argument("--gamma", type=int, default=None, help=f"streams; default {SHAPE_DEFAULTS['gamma']}")
    p.add_argument("--stream-layers", type=int, default=None, help=f"default {SHAPE_DEFAULTS['stream_layers']}")
    p.add_argument("--lora-rank", type=int, default=None, help=f"default {SHAPE_DEFAULTS['lora_rank']}")
    p.add_argument("--bonus-rank", type=int, default=None,
                   help="rank of the map that lets the streams read the bonus token (0 = off, the default); with "
                        "--init-adapter, a rank for an adapter without the map adds it")
    p.add_argument("--init-adapter", type=Path, default=None,
                   help="start from this adapter's weights, shape, stream scale and draft vocabulary")
    # The table's counts are not stored, so it cannot be merged with new data; rebuilding it from a
    # smaller set than the one that built it loses phrases (9,072 replies' table: +0.16 tau over 3,072's).
    p.add_argument("--keep-phrases", action="store_true",
                   help="keep the --init-adapter's phrase table rather than rebuild it from this run's replies "
                        "(for new data smaller than, or apart from, the data that built that table)")
    p.add_argument("--samples", type=int, default=1536, help="self-distilled prompts to generate")
    p.add_argument("--reply-tokens", type=int, default=160, help="greedy reply length for the data")
    p.add_argument("--prompt-file", type=Path, action="append", default=[], help="extra prompts (.txt or .jsonl)")
    p.add_argument("--data-dir", type=Path, default=None, help="where the self-distilled data is cached")
    p.add_argument("--generation-batch", type=int, default=48, help="batch size of data generation")
    p.add_argument("--generation-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="bfloat16 halves data generation time on CPUs with AVX-512 bf16; far slower without")
    p.add_argument("--limit-sequences", type=int, default=0, help="train on the first N sequences only (ablations)")
    p.add_argument("--draft-vocab", type=int, default=None,
                   help="tokens the streams may propose: the data's most frequent (0 = the whole vocabulary); "
                        f"default {SHAPE_DEFAULTS['draft_vocab']}")
    p.add_argument("--epochs", type=int, default=TrainSettings.epochs)
    p.add_argument("--batch-size", type=int, default=TrainSettings.batch_size)
    p.add_argument("--lr", type=float, default=TrainSettings.learning_rate)
    p.add_argument("--max-length", type=int, default=TrainSettings.max_length)
    p.add_argument("--seed", type=int, default=TrainSettings.seed)
    p.add_argument("--checkpoint-every", type=int, default=TrainSettings.checkpoint_every)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--stop-after", type=int, default=0, help="stop after this many steps (for tests)")
    p.add_argument("--time-limit", type=float, default=0,
                   help="seconds for the whole command (data, features, training): prompt sampling stops at 25 %% "
                        "of it and the schedule is shortened to what fits; 0: no limit")
    p.add_argument("--device", default="auto", help="auto or cpu")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default=None,
                   help="default: bf16 on a GPU, no on a CPU")
    # float32 features of 3037 sequences at 6 stream layers took ~16 GB of this 23 GB machine; bf16
    # storage halves that while the features are still computed (and trained on) in float32.
    p.add_argument("--feature-dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="how the cached main-stream features are stored; auto: the training precision")
    args = p.parse_args(argv)
    if args.init_adapter is None:
        for name, value in SHAPE_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        args.bonus_rank = args.bonus_rank or 0
    if args.keep_phrases and (args.init_adapter is None or not (args.init_adapter / PHRASES_FILE).is_file()):
        p.error("--keep-phrases needs an --init-adapter that has a phrase table")
    if args.mixed_precision is None:
        args.mixed_precision = "bf16" if torch.cuda.is_available() and args.device != "cpu" else "no"
    _warn_slow_bf16(args)
    if args.data_dir is None:
        name = f"{args.samples}-{args.reply_tokens}-{args.seed}-{args.generation_batch}-{args.generation_dtype}"
        args.data_dir = cache_root() / "distill" / name
    return args


def _warn_slow_bf16(args: argparse.Namespace) -> None:
    """bf16 on a CPU without AVX-512 runs in emulation: measured 60x slower than fp32 on an AVX2 EPYC."""
    on_cpu = args.device == "cpu" or not torch.cuda.is_available()
    wants_bf16 = args.generation_dtype == "bfloat16" or args.mixed_precision == "bf16"
    if on_cpu and wants_bf16 and "AVX512" not in torch.backends.cpu.get_cpu_capability():
        print(f"warning: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16 matmuls, so bf16 "
              "is far slower than float32 here; use --generation-dtype float32 --mixed-precision no", file=sys.stderr)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        for file in args.prompt_file:
            refuse_benchmark(file)
            if not file.is_file():
                raise ValueError(f"prompt file {file} does not exist")
        return train(args)
    except (AdapterError, ModelLoadError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None


if __name__ == "__main__":
    main()
