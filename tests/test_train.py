"""Training on the tiny model: the loss falls, lossless training leaves the base untouched,
resuming equals an unbroken run, and bad inputs give clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from specstream import train
from specstream.decoding import DecodeSettings, plain_decode, specstream_decode
from specstream.engine import build_model
from specstream.loading import load_base_model
from specstream.selfdistill import Sample


def write_samples(folder, count=24, seed=0, stride=1):
    rng = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for _ in range(count):
        prompt = [3] + torch.randint(6, 24, (4,), generator=rng).tolist() + [4]
        # Replies that follow a simple rule, so the streams have something learnable.
        start = int(torch.randint(6, 24, (1,), generator=rng))
        reply = [6 + (start - 6 + k * stride) % 18 for k in range(20)] + [2]
        lines.append(json.dumps(Sample("p", tuple(prompt), tuple(reply)).__dict__))
    (folder / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def argv(tiny_dir, data, out, *extra):
    return ["--out", str(out), "--model", str(tiny_dir), "--data-dir", str(data), "--gamma", "2", "--stream-layers", "2",
            "--lora-rank", "4", "--batch-size", "4", "--device", "cpu", "--lr", "0.01", *extra]


def test_loss_falls_and_base_is_untouched(tiny_dir, tmp_path):
    data = write_samples(tmp_path / "data")
    before = load_file(str(tiny_dir / "model.safetensors"))
    base = load_base_model(str(tiny_dir), device="cpu")
    prompt = [3, 7, 8, 4]
    greedy_before = [t for r in plain_decode(build_model(base, None), prompt, DecodeSettings(max_new_tokens=12)) for t in r.emitted_tokens]
    weights_before = [w.clone() for w in (base.weights.embed, base.weights.layers[-1].qkv, base.weights.final_norm)]
    first = train.main(argv(tiny_dir, data, tmp_path / "one", "--epochs", "1", "--stop-after", "1"))
    result = train.main(argv(tiny_dir, data, tmp_path / "a", "--epochs", "8"))
    assert result["last_batch"]["loss"] < first["last_batch"]["loss"] * 0.7
    assert result["eval"]["stream1_loss"] < first["eval"]["stream1_loss"] * 0.8
    after = load_file(str(tiny_dir / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(a, b) for a, b in zip(weights_before, (base.weights.embed, base.weights.layers[-1].qkv, base.weights.final_norm)))
    model = build_model(base, tmp_path / "a")
    greedy_after = [t for r in plain_decode(model, prompt, DecodeSettings(max_new_tokens=12)) for t in r.emitted_tokens]
    assert greedy_after == greedy_before
    assert len(model.phrases) == result["phrases"] > 0  # the phrase table of the training replies came along
    assert json.loads((tmp_path / "a" / "training_metrics.json").read_text())["steps"] == result["steps"]


def test_resume_equals_unbroken_run(tiny_dir, tmp_path):
    data = write_samples(tmp_path / "data")
    train.main(argv(tiny_dir, data, tmp_path / "whole", "--epochs", "2"))
    train.main(argv(tiny_dir, data, tmp_path / "split", "--epochs", "2", "--checkpoint-every", "3", "--stop-after", "3"))
    train.main(argv(tiny_dir, data, tmp_path / "split", "--epochs", "2", "--checkpoint-every", "3", "--resume"))
    whole = load_file(str(tmp_path / "whole" / "adapter.safetensors"))
    split = load_file(str(tmp_path / "split" / "adapter.safetensors"))
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], atol=1e-6, rtol=1e-5)


def test_shared_mode_says_so(tiny_dir, tmp_path):
    data = write_samples(tmp_path / "data")
    result = train.main(argv(tiny_dir, data, tmp_path / "shared", "--mode", "shared", "--epochs", "1"))
    assert "main_loss" in result["last_batch"]
    assert json.loads((tmp_path / "shared" / "adapter.json").read_text())["mode"] == "shared"


def test_bad_inputs(tiny_dir, tmp_path):
    data = write_samples(tmp_path / "data")
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(SystemExit, match="cannot write to"):
        train.main(argv(tiny_dir, data, blocked / "out"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "samples.jsonl").write_text("{broken\n")
    with pytest.raises(SystemExit, match="not a valid sample line"):
        train.main(argv(tiny_dir, bad, tmp_path / "o"))
    with pytest.raises(SystemExit, match="benchmark data"):
        train.main(argv(tiny_dir, data, tmp_path / "o", "--prompt-file", "../shared/data/spec_bench/question.jsonl"))
    with pytest.raises(SystemExit, match="prompt file .* does not exist"):
        train.main(argv(tiny_dir, data, tmp_path / "o", "--prompt-file", str(tmp_path / "none.txt")))


def test_draft_vocabulary_holds_the_data_tokens(tiny_dir, tmp_path):
    data = write_samples(tmp_path / "data")
    first = train.main(argv(tiny_dir, data, tmp_path / "one", "--draft-vocab", "22", "--epochs", "1", "--stop-after", "1"))
    result = train.main(argv(tiny_dir, data, tmp_path / "a", "--draft-vocab", "22", "--epochs", "8"))
    assert result["eval"]["stream1_loss"] < first["eval"]["stream1_loss"] * 0.8
    config = json.loads((tmp_path / "a" / "adapter.json").read_text())
    ids = load_file(str(tmp_path / "a" / "adapter.safetensors"))["draft_vocab"].tolist()
    assert config["draft_vocab_size"] == 22 and ids == sorted(ids)
    assert set(ids) == set(range(6, 24)) | {2, 3, 4, 0}  # every token of the data, then the lowest unseen id
    base = load_base_model(str(tiny_dir), device="cpu")
    model = build_model(base, tmp_path / "a")
    settings = DecodeSettings(max_new_tokens=16, tree="fixed", stop_at_eos=False)
    drafted = [n.token_id for r in specstream_decode(model, [3, 7, 8, 4], settings) for n in r.nodes if n.source == "stream"]
    assert drafted and set(drafted) <= set(ids)


def test_features_stored_in_bfloat16_are_computed_in_float32(tiny_dir, tmp_path):
    """Half the memory for the cached features (what bounds the data on a 23 GB machine), not bf16 math."""
    base = load_base_model(str(tiny_dir), device="cpu")
    sequences = [train.Sequence((3, 7, 8, 9, 10, 11, 4), 2), train.Sequence((3, 9, 12, 4, 6), 1)]
    full = train.precompute(base.weights, sequences, 1, True, 2, torch.float32, "fp32")[0]
    half = train.precompute(base.weights, sequences, 1, True, 2, torch.bfloat16, "bf16", torch.float32)[0]
    assert half.early_hidden.dtype == half.main_keys[0].dtype == torch.bfloat16
    assert torch.equal(half.early_hidden, full.early_hidden.to(torch.bfloat16))
    assert torch.equal(half.main_values[-1], full.main_values[-1].to(torch.bfloat16))
    data = write_samples(tmp_path / "data")
    first = train.main(argv(tiny_dir, data, tmp_path / "one", "--epochs", "1", "--stop-after", "1", "--feature-dtype", "bfloat16"))
    result = train.main(argv(tiny_dir, data, tmp_path / "b", "--epochs", "8", "--feature-dtype", "bfloat16"))
    assert result["feature_dtype"] == "bfloat16"
    assert result["last_batch"]["loss"] < first["last_batch"]["loss"] * 0.7


def test_time_limit_fits_the_schedule_to_the_budget(tiny_dir, tmp_path):
    assert train.fitted_total(planned=1000, done=8, seconds_per_step=0.5, seconds_left=100) == 208
    assert train.fitted_total(planned=100, done=8, seconds_per_step=0.5, seconds_left=100) == 100
    assert train.fitted_total(planned=100, done=8, seconds_per_step=0.5, seconds_left=-5) == 9
    data = write_samples(tmp_path / "data", count=96)
    # 200 epochs of 23 steps cannot fit in 40 s on any machine: the run ends in time with a shorter
    # schedule, and its learning rate reached zero on it (the adapter is written).
    result = train.main(argv(tiny_dir, data, tmp_path / "timed", "--epochs", "200", "--time-limit", "40"))
    assert result["planned_steps"] == 23 * 200
    assert result["steps"] == result["steps_run"] < result["planned_steps"]
    assert (tmp_path / "timed" / "adapter.safetensors").is_file()


def test_data_is_generated_with_padding_and_without_repeated_prompts(tiny_dir, tmp_path):
    from specstream.selfdistill import build_dataset, load_samples

    # The tiny tokenizer has no pad token (nor has transformers 5's GGUF tokenizer of the default
    # model), and batched generation pads.
    base = load_base_model(str(tiny_dir), device="cpu")
    assert base.tokenizer.pad_token is None
    extra = tmp_path / "extra.txt"
    extra.write_text("w3 w4 w5 w6\nw3 w4 w5 w6\nw7 w8 w9\n")
    samples = build_dataset(base, tmp_path / "data", count=4, prompt_files=(extra,), max_new_tokens=3, batch_size=3)
    prompts = [s.prompt for s in samples]
    assert len(prompts) == len(set(prompts)) and "w3 w4 w5 w6" in prompts and "w7 w8 w9" in prompts
    assert all(1 <= len(s.reply_ids) <= 3 for s in samples)
    assert load_samples(tmp_path / "data" / "samples.jsonl") == samples


def test_two_processes_agree_on_a_time_limited_schedule(tiny_dir, tmp_path):
    import os
    import subprocess
    import sys

    # Several processes (here two on the CPU, as `accelerate launch` or torchrun start them) each time
    # their own steps; they must run the same number, or the gradient all-reduce would hang.
    data = write_samples(tmp_path / "data", count=96)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.getcwd())
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "specstream.train", *argv(tiny_dir, data, tmp_path / "two", "--epochs", "200", "--time-limit", "30")]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = json.loads((tmp_path / "two" / "training_metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps_run"] == metrics["steps"] < metrics["planned_steps"]


def test_init_adapter_trains_on_from_its_weights(tiny_dir, tmp_path):
    """More data for an adapter already made: training starts where that adapter stands, in its shape."""
    data = write_samples(tmp_path / "data")
    trained = train.main(argv(tiny_dir, data, tmp_path / "a", "--epochs", "8", "--draft-vocab", "22"))
    fresh = train.main(argv(tiny_dir, data, tmp_path / "fresh", "--epochs", "1", "--stop-after", "1"))
    more = write_samples(tmp_path / "more", seed=1)
    shape_free = ["--out", str(tmp_path / "b"), "--model", str(tiny_dir), "--data-dir", str(more), "--batch-size", "4",
                  "--device", "cpu", "--lr", "0.001", "--init-adapter", str(tmp_path / "a")]
    went_on = train.main([*shape_free, "--epochs", "1", "--stop-after", "1"])
    assert went_on["last_batch"]["loss"] < fresh["last_batch"]["loss"] * 0.7
    assert went_on["eval"]["stream1_loss"] < trained["eval"]["stream1_loss"] * 1.5
    before, after = (json.loads((tmp_path / name / "adapter.json").read_text()) for name in ("a", "b"))
    assert {k: v for k, v in after.items() if k != "training"} == {k: v for k, v in before.items() if k != "training"}
    assert torch.equal(load_file(str(tmp_path / "a" / "adapter.safetensors"))["draft_vocab"],
                       load_file(str(tmp_path / "b" / "adapter.safetensors"))["draft_vocab"])
    with pytest.raises(SystemExit, match="--lora-rank 8 differs from the --init-adapter's 4"):
        train.main([*shape_free, "--lora-rank", "8"])
    with pytest.raises(SystemExit, match="--draft-vocab 20 differs from the --init-adapter's 22"):
        train.main([*shape_free, "--draft-vocab", "20"])
    with pytest.raises(SystemExit, match="adapter folder .* does not exist"):
        train.main([*shape_free[:-1], str(tmp_path / "none")])


def test_keep_phrases_carries_the_init_adapters_table_over(tiny_dir, tmp_path, capsys):
    """By default a run rebuilds the phrase table from its own replies; --keep-phrases keeps the
    --init-adapter's (a run on a little new data must not drop the table of a bigger set)."""
    train.main(argv(tiny_dir, write_samples(tmp_path / "data"), tmp_path / "a", "--epochs", "1"))
    on_from = ["--model", str(tiny_dir), "--data-dir", str(write_samples(tmp_path / "other", stride=5)),
               "--batch-size", "4", "--device", "cpu", "--epochs", "1", "--init-adapter", str(tmp_path / "a")]
    train.main([*on_from, "--out", str(tmp_path / "rebuilt")])
    kept = train.main([*on_from, "--out", str(tmp_path / "kept"), "--keep-phrases"])
    table = {name: (tmp_path / name / "phrases.safetensors").read_bytes() for name in ("a", "rebuilt", "kept")}
    assert table["kept"] == table["a"] != table["rebuilt"]
    assert kept["phrases"] == len(build_model(load_base_model(str(tiny_dir), device="cpu"), tmp_path / "a").phrases)
    with pytest.raises(SystemExit):
        train.main(argv(tiny_dir, tmp_path / "data", tmp_path / "c", "--keep-phrases"))
    assert "--keep-phrases needs an --init-adapter that has a phrase table" in capsys.readouterr().err
    (tmp_path / "a" / "phrases.safetensors").write_bytes(b"not a table")
    with pytest.raises(SystemExit, match="is not a phrase table"):
        train.main([*on_from, "--out", str(tmp_path / "k2"), "--keep-phrases"])


def test_bonus_map_joins_an_adapter_as_a_no_op_and_then_learns(tiny_dir, tmp_path):
    """--bonus-rank on an --init-adapter without the map adds one that changes nothing until trained."""
    data = write_samples(tmp_path / "data")
    first = train.main(argv(tiny_dir, data, tmp_path / "a", "--epochs", "4"))
    on_from = ["--model", str(tiny_dir), "--data-dir", str(data), "--batch-size", "4", "--device", "cpu",
               "--init-adapter", str(tmp_path / "a"), "--bonus-rank", "4", "--epochs", "2"]
    still = train.main([*on_from, "--out", str(tmp_path / "still"), "--lr", "0"])
    assert still["eval"] == first["eval"]
    train.main([*on_from, "--out", str(tmp_path / "b"), "--lr", "0.01"])
    weights = load_file(str(tmp_path / "b" / "adapter.safetensors"))
    assert json.loads((tmp_path / "b" / "adapter.json").read_text())["bonus_rank"] == 4
    assert weights["bonus_up"].abs().max() > 0
    base = load_base_model(str(tiny_dir), device="cpu")
    model, prompt = build_model(base, tmp_path / "b"), [3, 7, 8, 4]
    settings = DecodeSettings(max_new_tokens=12, tree="fixed", node_budget=8)
    spec = [t for r in specstream_decode(model, prompt, settings) for t in r.emitted_tokens]
    assert spec == [t for r in plain_decode(model, prompt, settings) for t in r.emitted_tokens]
    with pytest.raises(SystemExit, match="--bonus-rank 8 differs from the --init-adapter's 4"):
        train.main([*on_from[:-5], str(tmp_path / "b"), "--bonus-rank", "8", "--out", str(tmp_path / "c")])
