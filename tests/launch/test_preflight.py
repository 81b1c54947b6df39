"""`lmforge preflight` through the real CLI: an `ok` summary with real numbers, or one line per problem and exit 2."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint_space import human_bytes
from pretrain.model import ModelConfig, Transformer
from tests.launch.launch_runs import REPO, launch_env, tiny_train_args


def preflight(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge.cli", "preflight", *args], cwd=REPO, env=launch_env(**env),
                          capture_output=True, text=True, timeout=300)


def tiny_params() -> int:
    config = ModelConfig(arch="llama", vocab_size=512, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, max_seq_len=128)
    with torch.device("meta"):
        return Transformer(config).num_params()


def test_ok_summary_gives_world_size_batch_tokens_params_and_checkpoint_size(shards, tmp_path):
    result = preflight(*tiny_train_args(tmp_path / "run", shards), "--world-size", "2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    params = tiny_params()
    assert out.startswith("ok: tiny\n")
    assert "world size    2 rank(s)" in out
    assert "global batch  4 sequences = micro 2 × accum 1 × 2 ranks" in out
    assert "tokens/step   128 (32 tokens per sequence)" in out
    assert f"({params:,} params × 16 bytes)" in out and f"~{human_bytes(params * 16)} each" in out
    assert "1 on disk (train.save_interval = 0: saved at the end only)" in out
    assert "checksums verified" in out and "ZeRO-1, fp32" in out
    assert result.stderr == ""


def test_world_size_comes_from_the_hostfile_slots_the_filters_select(shards, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# comment\nworker-0 slots=4\n\nworker-1 slots=4\nworker-2 slots=4\n")
    result = preflight(*tiny_train_args(tmp_path / "run", shards), "--hostfile", str(hostfile), "--exclude", "worker-1:0,1")
    assert result.returncode == 0, result.stderr
    assert "10 rank(s) on 3 host(s)" in result.stdout
    assert "global batch  20 sequences = micro 2 × accum 1 × 10 ranks" in result.stdout


def test_print_exports_gives_the_arch_list_deepspeed_can_parse(shards, tmp_path):
    result = preflight(*tiny_train_args(tmp_path / "run", shards), "--print-exports", TORCH_CUDA_ARCH_LIST="8.0;9.0a")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "export TORCH_CUDA_ARCH_LIST='8.0;9.0'\n"
    assert "ok: tiny" in result.stderr and "'8.0;9.0a' -> '8.0;9.0'" in result.stderr


def test_deepspeed_env_file_holds_forwarded_variables_and_the_users_own(shards, tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".deepspeed_env").write_text("NCCL_IB_HCA=mlx5\n")
    run_dir = tmp_path / "run"
    result = preflight(*tiny_train_args(run_dir, shards), "--deepspeed-env", "--export", "LMFORGE_PROBE", "--print-exports",
                       HOME=str(tmp_path / "home"), LMFORGE_PROBE="a b", TORCH_CUDA_ARCH_LIST="9.0a")
    assert result.returncode == 0, result.stderr
    lines = (run_dir / ".deepspeed_env").read_text().splitlines()
    assert lines[0] == "NCCL_IB_HCA=mlx5"
    assert {"TORCH_CUDA_ARCH_LIST=9.0", "LMFORGE_PROBE=a b", "OMP_NUM_THREADS=1"} <= set(lines)
    assert any(line.startswith("PATH=") for line in lines)
    assert f"export DS_ENV_FILE={(run_dir / '.deepspeed_env').resolve()}" in result.stdout


def _corrupt_copy(shards: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    path = copy / "train_00000.bin"
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # same size, different bytes
    path.write_bytes(bytes(data))
    return copy


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


BROKEN = {
    "bad_yaml_key": (lambda s, t: tiny_train_args(t / "run", s, **{"train.max_step": 5}),
                     "unknown key 'train.max_step'; did you mean 'max_steps'?"),
    "missing_data_dir": (lambda s, t: tiny_train_args(t / "run", t / "no-such-shards"),
                         "no-such-shards: no manifest.json there"),
    "vocab_mismatch": (lambda s, t: tiny_train_args(t / "run", s, **{"model.vocab_size": 1000}),
                       "model.vocab_size = 1000 but the tokenizer of data.path has 512 tokens"),
    "batch_contradiction": (lambda s, t: tiny_train_args(t / "run", s, **{"deepspeed.config": _write(
                                t / "ds.json", json.dumps({"train_batch_size": 64, "zero_optimization": {"stage": 1}}))})
                            + ["--world-size", "2"],
                            "train_batch_size = 64 contradicts train.micro_batch_size × train.grad_accum_steps × 2 ranks = 4"),
    "bad_hostfile_line": (lambda s, t: tiny_train_args(t / "run", s) + [
                              "--hostfile", _write(t / "hosts", "worker-0 slots=2\nworker-1 slots:2\n")],
                          "hosts:2: 'worker-1 slots:2': expected 'HOST slots=N'"),
    "world_size_not_hostfile_slots": (lambda s, t: tiny_train_args(t / "run", s) + [
                                          "--hostfile", _write(t / "hosts", "worker-0 slots=2\nworker-1 slots=2\n"),
                                          "--world-size", "2"],
                                      "--world-size 2 but"),
    "include_unknown_host": (lambda s, t: tiny_train_args(t / "run", s) + [
                                 "--hostfile", _write(t / "hosts", "worker-0 slots=2\n"), "--include", "worker-9"],
                             "--include 'worker-9': host 'worker-9' is not in"),
    "optimizer_offload_with_stage_0": (lambda s, t: tiny_train_args(t / "run", s, **{"deepspeed.config": _write(
                                           t / "ds.json", json.dumps({"zero_optimization": {
                                               "stage": 0, "offload_optimizer": {"device": "cpu"}}}))}),
                                       "offload_optimizer.device = 'cpu' with zero_optimization.stage = 0: "
                                       "offloading optimizer states needs stage 1 or higher"),
    "param_offload_with_stage_2": (lambda s, t: tiny_train_args(t / "run", s, **{"deepspeed.config": _write(
                                       t / "ds.json", json.dumps({"zero_optimization": {
                                           "stage": 2, "offload_param": {"device": "cpu"}}}))}),
                                   "offloading parameters needs stage 3"),
    "checksum_mismatch": (lambda s, t: tiny_train_args(t / "run", _corrupt_copy(s, t)),
                          "train_00000.bin: sha256"),
    "unwritable_run_dir": (lambda s, t: tiny_train_args(Path(_write(t / "a-file", "")) / "run", s),
                           "/a-file/run: not writable (Not a directory)"),
    "no_disk_for_checkpoints": (lambda s, t: tiny_train_args(t / "run", s, **{
                                    "model.d_model": 65536, "model.n_heads": 64, "model.n_kv_heads": 8, "model.n_layers": 4}),
                                "free, but checkpoints need"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_each_broken_input_is_one_line_and_exit_2(case, shards, tmp_path):
    make_args, expected = BROKEN[case]
    result = preflight(*make_args(shards, tmp_path))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_a_bad_arch_list_is_one_line_naming_the_variable(shards, tmp_path):
    result = preflight(*tiny_train_args(tmp_path / "run", shards), TORCH_CUDA_ARCH_LIST="sm_90")
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["error: TORCH_CUDA_ARCH_LIST = 'sm_90': 'sm_90' is not an arch like '8.0', '9.0' or '9.0+PTX'"]


def test_every_problem_is_reported_at_once(shards, tmp_path):
    ds_json = _write(tmp_path / "ds.json", json.dumps({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}}))
    args = tiny_train_args(tmp_path / "run", shards, **{"model.vocab_size": 1000, "deepspeed.config": ds_json})
    result = preflight(*args, "--hostfile", _write(tmp_path / "hosts", "worker-0 slots=x\n"))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines), result.stderr
    assert "hosts:1" in lines[0] and "model.vocab_size = 1000" in lines[1] and "offload_optimizer" in lines[2]


def test_a_run_whose_estimated_host_peak_exceeds_the_host_is_refused_in_one_line_and_nothing_is_created(shards, tmp_path):
    run_dir = tmp_path / "run"
    result = preflight(*tiny_train_args(run_dir, shards), "--host-memory-gib", "0.1", "--deepspeed-env")
    assert result.returncode == 2, result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("error: estimated host peak ") and "> --host-memory-gib 0.1 GiB; largest: " in lines[0]
    assert "lower it with " in lines[0]
    assert result.stdout == "" and not run_dir.exists()


def test_gpu_memory_flag_judges_the_gpu_peak_for_another_machine(shards, tmp_path):
    result = preflight(*tiny_train_args(tmp_path / "run", shards), "--gpu-memory-gib", "0.5", "--host-memory-gib", "64")
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: estimated gpu peak ") and "> --gpu-memory-gib 0.5 GiB" in line and "CUDA context 0.6 GiB" in line
    fits = preflight(*tiny_train_args(tmp_path / "run", shards), "--gpu-memory-gib", "140", "--host-memory-gib", "64")
    assert fits.returncode == 0, fits.stderr
    assert "  memory        estimated GPU peak 0.6 GiB per rank (cuda), host peak 2.6 GiB of 64.0 GiB" in fits.stdout
