"""Real single-process DeepSpeed runs: what the training loop promises besides ZeRO equality."""
import json
import subprocess
import sys

import pytest

from pretrain.config import REPO_ROOT
from tests.pretrain.training_runs import run_env, run_training, step_losses, tiny_overrides, training_command

pytestmark = pytest.mark.slow


def test_activation_checkpointing_keeps_the_losses(shards, tmp_path):
    plain = run_training(tmp_path / "plain", shards, **{"deepspeed.config": "ds_configs/zero1.json"})
    recomputed = run_training(tmp_path / "ckpt", shards, **{"deepspeed.config": "ds_configs/zero1_actckpt.json"})
    assert recomputed == pytest.approx(plain, abs=1e-6)


def test_gradient_accumulation_of_two_equals_a_twice_larger_micro_batch(shards, tmp_path):
    accumulated = run_training(tmp_path / "accum", shards, **{"train.micro_batch_size": 2, "train.grad_accum_steps": 2})
    larger = run_training(tmp_path / "large", shards, **{"train.micro_batch_size": 4, "train.grad_accum_steps": 1})
    assert accumulated == pytest.approx(larger, abs=1e-5)


def test_loss_falls_on_the_default_corpus_with_the_tiny_preset(shards, tmp_path):
    losses = run_training(tmp_path / "run", shards, **{
        "train.max_steps": 60, "train.micro_batch_size": 8, "train.seq_len": 64, "train.lr": 3e-3,
        "train.warmup_steps": 6, "model.d_model": 64, "train.eval_interval": 30,
    })
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    train_keys = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_second", "mfu", "memory_gb"}
    assert train_keys <= set(records[0])
    assert records[0]["tokens"] == 8 * 64
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [30, 60]
    assert val[-1]["val_loss"] < val[0]["val_loss"] + 0.5


def test_bf16_run_completes_and_reports_its_precision(shards, tmp_path):
    config = json.loads((REPO_ROOT / "ds_configs/zero2_bf16.json").read_text())
    config["bf16"]["enabled"] = True  # "auto" means fp32 on a CPU; force DeepSpeed's bf16 mode here
    path = tmp_path / "bf16.json"
    path.write_text(json.dumps(config))
    losses = run_training(tmp_path / "run", shards, **{"deepspeed.config": str(path), "train.max_steps": 4})
    assert len(losses) == 4 and all(loss == loss for loss in losses)


def test_fp16_run_with_dynamic_loss_scaling_completes(shards, tmp_path):
    """DeepSpeed's own fp16 optimizer is GPU-only; on a CPU its torch_autocast fp16 path (ZeRO-0 with
    torch's dynamic GradScaler, created by DeepSpeed's engine) is the fp16 run that can be checked."""
    config = json.loads((REPO_ROOT / "ds_configs/zero0.json").read_text())
    config["torch_autocast"] = {"enabled": True, "dtype": "float16"}
    path = tmp_path / "fp16.json"
    path.write_text(json.dumps(config))
    cmd = training_command(1) + ["--config", "tiny"] + tiny_overrides(
        tmp_path / "run", shards, **{"deepspeed.config": str(path), "train.max_steps": 4})
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=run_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ZeRO-0, autocast-float16" in result.stdout
    losses = step_losses(tmp_path / "run")
    assert len(losses) == 4 and all(loss == loss for loss in losses)


def test_zero3_with_cpu_offload_trains(shards, tmp_path):
    losses = run_training(tmp_path / "run", shards, timeout=900, **{
        "deepspeed.config": "ds_configs/zero3_offload.json", "train.max_steps": 4})
    assert len(losses) == 4 and losses[-1] < losses[0]


def test_tensorboard_plot_and_generate_work_on_a_finished_run(shards, tmp_path):
    run = tmp_path / "run"
    run_training(run, shards, **{"run.tensorboard": "true", "train.max_steps": 4})
    assert list((run / "tb").glob("events.out.tfevents.*"))
    env = run_env()
    plot = subprocess.run([sys.executable, "-m", "lmforge.cli", "plot", str(run)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True)
    assert plot.returncode == 0, plot.stderr
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    gen = subprocess.run([sys.executable, "-m", "lmforge.cli", "generate", "--checkpoint", str(run),
                          "--prompt", "def ", "--max-new-tokens", "8", "--seed", "3"],
                         cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert gen.returncode == 0, gen.stderr
    assert "--- sample (step_00000004) ---" in gen.stdout
    assert gen.stdout.split("---\n", 1)[1].startswith("def ")


BAD_INPUTS = [
    (["--set", "train.max_stepz=3"], "unknown key 'train.max_stepz'; did you mean 'max_steps'?"),
    (["--set", "train.seq_len=999"], "train.seq_len = 999: must not exceed model.max_seq_len = 128"),
    (["--set", "data.path=[/nonexistent/shards]"], "data.path = /nonexistent/shards: no manifest.json there"),
    (["--set", "model.vocab_size=1234"], "model.vocab_size = 1234 but the tokenizer of data.path has"),
    (["--set", "deepspeed.config=ds_configs/nope.json"], "deepspeed.config = ds_configs/nope.json: file not found"),
    (["--config", "no-such-preset"], "no-such-preset.yaml: config file not found"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[m.split(":")[0][:30] for _, m in BAD_INPUTS])
def test_bad_input_is_one_line_before_any_process_group(args, message, shards, tmp_path):
    cmd = [sys.executable, "-m", "pretrain.train", "--set", f"run.dir={tmp_path / 'run'}", "--set", f"data.path=[{shards}]"]
    cmd += args if args[0] == "--config" else ["--config", "tiny", *args]
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=run_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr and "process group" not in result.stdout + result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
