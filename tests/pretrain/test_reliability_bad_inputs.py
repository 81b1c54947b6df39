"""A catalogue of malformed inputs across the CLI verbs, each run for real: exit code 2, exactly one
stderr line `error: ...` naming the file or key and what was expected, no traceback, and no file
that existed before is changed (nor any new file or folder written).

The cases of issue 20 and after (DeepSpeed JSON, numbers, readers, tokenizer symbols, post-training
meaning, generate/eval/import) are in the sibling modules bad_inputs_*.py; all run through the one
test below."""
from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.cli import VERBS
from tests.pretrain.bad_input_catalogue import (
    BadInput, flip_byte, idx_says_int32, other_tokenizer_shards, train, truncate, write,
)
from tests.pretrain.bad_inputs_data_and_tools import DATA_AND_TOOL_CASES
from tests.pretrain.bad_inputs_launch import LAUNCH_CASES
from tests.pretrain.training_runs import REPO, run_env, run_training

CHECKPOINT = "run/checkpoints/step_00000002"
CASES = [
    # configs
    BadInput("config-unknown-key", lambda ws: train(ws, "train.max_step=5"), ("unknown key 'train.max_step'; did you mean 'max_steps'?",)),
    BadInput("config-unknown-section", lambda ws: train(ws, "trian.lr=1"), ("unknown section 'trian'; did you mean 'train'?",)),
    BadInput("config-wrong-type", lambda ws: train(ws, "train.lr=fast"), ("train.lr = 'fast': expected a number",)),
    BadInput("config-negative-size", lambda ws: train(ws, "train.micro_batch_size=-1"), ("train.micro_batch_size = -1: must be at least 1",)),
    BadInput("config-heads-not-dividing-width", lambda ws: train(ws, "model.d_model=34"),  # 30 is also an odd RoPE head: 2 lines
             ("model.d_model = 34: must be divisible by model.n_heads = 4",)),
    BadInput("config-gqa-ratio", lambda ws: train(ws, "model.n_kv_heads=3"), ("model.n_kv_heads = 3: must divide model.n_heads = 4",)),
    BadInput("config-not-a-boolean", lambda ws: train(ws, "run.tensorboard=maybe"), ("run.tensorboard = 'maybe': expected true or false",)),
    BadInput("config-unknown-arch", lambda ws: train(ws, "model.arch=gpt5"), ("model.arch = 'gpt5': expected one of 'gpt2', 'llama'",)),
    BadInput("config-seq-len-beyond-context", lambda ws: train(ws, "train.seq_len=4096"),
             ("train.seq_len = 4096: must not exceed model.max_seq_len = 128",)),
    BadInput("config-set-without-value", lambda ws: ["train", "--set", "train.lr"], ("--set 'train.lr': expected section.key=value",)),
    BadInput("config-file-missing", lambda ws: ["train", "--config", str(ws / "none.yaml")], ("{ws}/none.yaml: config file not found",)),
    BadInput("config-invalid-yaml", lambda ws: ["train", "--config", str(ws / "bad.yaml")], ("{ws}/bad.yaml (line 3): not valid YAML",),
             (write("bad.yaml", "train:\n  lr: [1, 2\n"),)),
    BadInput("config-not-a-mapping", lambda ws: ["train", "--config", str(ws / "list.yaml")],
             ("{ws}/list.yaml: expected a mapping of sections",), (write("list.yaml", "- 1\n- 2\n"),)),
    BadInput("config-max-bad-steps-zero", lambda ws: train(ws, "train.max_bad_steps=0"), ("train.max_bad_steps = 0: must be at least 1",)),
    # DeepSpeed JSONs
    BadInput("ds-invalid-json", lambda ws: train(ws, f"deepspeed.config={ws / 'bad.json'}"), ("{ws}/bad.json: not valid JSON (line 1",),
             (write("bad.json", '{"zero_optimization": '),)),
    BadInput("ds-not-an-object", lambda ws: train(ws, f"deepspeed.config={ws / 'list.json'}"),
             ("{ws}/list.json: expected a JSON object of DeepSpeed settings",), (write("list.json", "[1]"),)),
    BadInput("ds-batch-arithmetic", lambda ws: train(ws, f"deepspeed.config={ws / 'batch.json'}"),
             ("{ws}/batch.json: train_batch_size = 999 contradicts train.micro_batch_size × train.grad_accum_steps × 1 ranks = 2",),
             (write("batch.json", '{"train_batch_size": 999}'),)),
    BadInput("ds-file-missing", lambda ws: train(ws, f"deepspeed.config={ws / 'none.json'}"),
             ("deepspeed.config = {ws}/none.json: file not found",)),
    BadInput("ds-fp16-without-gpu", lambda ws: train(ws, "deepspeed.config=ds_configs/zero2_fp16.json"),
             ("zero2_fp16.json: fp16.enabled = true, but DeepSpeed trains in fp16 only on GPUs",),
             marks=(pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 trains on a GPU"),)),
    BadInput("ds-two-precisions", lambda ws: train(ws, f"deepspeed.config={ws / 'both.json'}"),
             ("bf16.enabled and fp16.enabled are both true; choose one",),
             (write("both.json", '{"bf16": {"enabled": true}, "fp16": {"enabled": true}}'),)),
    # corpora
    BadInput("corpus-empty", lambda ws: ["prep", "tokenizer", "--input", str(ws / "empty.txt"), "--output", str(ws / "tok")],
             ("empty corpus",), (write("empty.txt", ""),)),
    BadInput("corpus-binary", lambda ws: ["prep", "tokenizer", "--input", str(ws / "blob.bin"), "--output", str(ws / "tok")],
             ("{ws}/blob.bin: byte", "not valid UTF-8", "--skip-bad-documents"),
             (write("blob.bin", bytes(random.Random(1).randrange(128, 256) for _ in range(4096))),)),
    BadInput("corpus-invalid-utf8", lambda ws: ["prep", "tokenizer", "--input", str(ws / "latin1.py"), "--output", str(ws / "tok")],
             ("{ws}/latin1.py: byte 11: not valid UTF-8",), (write("latin1.py", b"x = 1\n# caf\xe9\n"),)),
    BadInput("corpus-huge-single-line", lambda ws: ["prep", "tokenizer", "--input", str(ws / "line.txt"), "--output", str(ws / "tok"),
                                                    "--vocab-size", "512"],
             ("{ws}/line.txt: --vocab-size 512 is too large for this corpus",), (write("line.txt", "x" * 3_000_000),)),
    # shards
    BadInput("shards-flipped-byte-in-bin", lambda ws: train(ws), ("{ws}/shards/train_00001.bin: sha256", "does not match the manifest"),
             (flip_byte("shards/train_00001.bin"),)),
    BadInput("shards-truncated-idx", lambda ws: train(ws), ("{ws}/shards/valid_00000.idx: 40 bytes, manifest says",),
             (truncate("shards/valid_00000.idx"),)),
    BadInput("shards-truncated-bin", lambda ws: train(ws), ("{ws}/shards/train_00002.bin: 40 bytes, manifest says",),
             (truncate("shards/train_00002.bin"),)),
    BadInput("shards-no-manifest", lambda ws: train(ws, data="emptydir"), ("data.path = {ws}/emptydir: no manifest.json there",)),
    BadInput("shards-of-two-tokenizers", lambda ws: train(ws, f"data.path=[{ws / 'shards'},{ws / 'other'}]"),
             ("data.path: shard sets were made with different tokenizers",), (other_tokenizer_shards,)),
    BadInput("shards-vocab-mismatch", lambda ws: train(ws, "model.vocab_size=1000"),
             ("model.vocab_size = 1000 but the tokenizer of data.path has 512 tokens",)),
    BadInput("shards-wrong-dtype", lambda ws: train(ws), ("{ws}/shards/train_00000.bin:", "tokens of int32"), (idx_says_int32,)),
    BadInput("prep-verify-corrupted-shards", lambda ws: ["prep", "verify", str(ws / "shards")],
             ("{ws}/shards/train_00000.idx: sha256",), (flip_byte("shards/train_00000.idx", 60),)),
    # hostfiles
    BadInput("hostfile-bad-syntax", lambda ws: ["preflight", "--set", f"data.path=[{ws / 'shards'}]", "--hostfile", str(ws / "hosts")],
             ("{ws}/hosts:1: 'worker-0 slots=abc': expected 'HOST slots=N'",), (write("hosts", "worker-0 slots=abc\n"),)),
    BadInput("hostfile-duplicate-host", lambda ws: ["preflight", "--set", f"data.path=[{ws / 'shards'}]", "--hostfile", str(ws / "hosts")],
             ("{ws}/hosts:2: host 'worker-0' is listed twice",), (write("hosts", "worker-0 slots=2\nworker-0 slots=2\n"),)),
    # run directories
    BadInput("run-dir-under-a-file", lambda ws: train(ws, run="afile/run"), ("run.dir = {ws}/afile/run: not writable (Not a directory)",),
             (write("afile", "x"),)),
    BadInput("run-dir-disk-too-small", lambda ws: train(ws, "model.n_layers=96", "model.d_model=12288", "model.n_heads=96",
                                                        "model.n_kv_heads=null"),
             ("run.dir = {ws}/newrun:", "free, but checkpoints need", "lower train.keep_last")),
    # checkpoints
    BadInput("checkpoint-of-another-architecture", lambda ws: train(ws, "model.n_layers=3", run="run"),
             (f"{{ws}}/{CHECKPOINT}: written for a different model (model.n_layers = 2 there, 3 in the config)",)),
    BadInput("checkpoint-damaged", lambda ws: train(ws, run="run"),
             (f"{{ws}}/{CHECKPOINT}/mp_rank_00_model_states.pt: sha256 does not match the checkpoint record",),
             (flip_byte(f"{CHECKPOINT}/mp_rank_00_model_states.pt", 2000),)),
    BadInput("checkpoint-file-missing", lambda ws: train(ws, run="run"),
             (f"{{ws}}/{CHECKPOINT}/rng_rank0.pt: missing (listed in",), (lambda ws: (ws / CHECKPOINT / "rng_rank0.pt").unlink(),)),
    BadInput("checkpoint-latest-names-nothing", lambda ws: train(ws, run="run"),
             ("{ws}/run/checkpoints/latest names 'step_00000099', which is missing or incomplete",),
             (write("run/checkpoints/latest", "step_00000099"),)),
    # other verbs
    BadInput("eval-step-without-checkpoint", lambda ws: ["eval", "--checkpoint", str(ws / "run"), "--step", "3"],
             ("{ws}/run: no complete checkpoint for --step 3 (complete steps: 2)",)),
    BadInput("export-hf-over-existing-output", lambda ws: ["export-hf", "--checkpoint", str(ws / "run"), "--output", str(ws / "hf")],
             ("--output {ws}/hf: exists and is not empty, with files lmforge did not write (README)",), (write("hf/README", "mine"),)),
    BadInput("import-hf-not-a-model", lambda ws: ["import-hf", "--model", str(ws / "emptydir"), "--output", str(ws / "imported")],
             ("{ws}/emptydir: no config.json",)),
    BadInput("sft-malformed-jsonl", lambda ws: ["sft", "--set", f"init.from_run={ws / 'run'}", "--set", f"data.train={ws / 'sft.jsonl'}",
                                                "--set", f"run.dir={ws / 'sft'}"],
             ("{ws}/sft.jsonl:2: not valid JSON",), (write("sft.jsonl", '{"prompt": "a", "response": "b"}\n{"prompt": "x"\n'),)),
    BadInput("reward-pair-without-rejected", lambda ws: ["reward", "--set", f"init.from_run={ws / 'run'}",
                                                         "--set", f"data.train={ws / 'pairs.jsonl'}", "--set", f"run.dir={ws / 'rm'}"],
             ('{ws}/pairs.jsonl:1: "rejected" is missing or null, not a string',),
             (write("pairs.jsonl", '{"prompt": "a", "chosen": "b"}\n'),)),
    BadInput("dpo-negative-beta", lambda ws: ["dpo", "--set", f"init.from_run={ws / 'run'}", "--set", f"data.train={ws / 'pairs.jsonl'}",
                                              "--set", f"run.dir={ws / 'dpo'}", "--set", "dpo.beta=-1"],
             ("dpo.beta = -1.0: must be positive",), (write("pairs.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c"}\n'),)),
    BadInput("ppo-prompt-record-without-prompt", lambda ws: ["ppo", "--set", f"init.from_run={ws / 'run'}", "--set", "ppo.reward_run=null",
                                                             "--set", "ppo.reward_function=digit_fraction",
                                                             "--set", f"data.train={ws / 'prompts.jsonl'}", "--set", f"run.dir={ws / 'ppo'}"],
             ('{ws}/prompts.jsonl:1: "prompt" is missing or null, not a string',), (write("prompts.jsonl", '{"text": "a"}\n'),)),
    BadInput("grpo-group-of-one", lambda ws: ["grpo", "--set", f"init.from_run={ws / 'run'}", "--set", f"data.train={ws / 'prompts.jsonl'}",
                                              "--set", f"run.dir={ws / 'grpo'}", "--set", "grpo.group_size=1"],
             ("grpo.group_size = 1: must be at least 2",), (write("prompts.jsonl", '{"prompt": "a"}\n'),)),
    BadInput("generate-no-new-tokens", lambda ws: ["generate", "--checkpoint", str(ws / "run"), "--prompt", "x", "--max-new-tokens", "0"],
             ("--max-new-tokens and --num-samples must be at least 1",)),
    BadInput("generate-top-p-above-1", lambda ws: ["generate", "--checkpoint", str(ws / "run"), "--prompt", "x", "--top-p", "1.5"],
             ("--top-p 1.5: expected", "0 < top-p <= 1")),
    BadInput("plot-without-metrics", lambda ws: ["plot", str(ws / "emptydir")], ("{ws}/emptydir/metrics.jsonl: no training metrics to plot",)),
    BadInput("unknown-verb", lambda ws: ["trian"], ("unknown verb 'trian'; did you mean 'train'?",)),
]
ORIGINAL_CASES = len(CASES)  # 51 before issue 20
CASES += LAUNCH_CASES + DATA_AND_TOOL_CASES


def test_the_catalogue_has_at_least_30_inputs_across_the_verbs():
    assert len(CASES) >= ORIGINAL_CASES + 60
    assert len({c.name for c in CASES}) == len(CASES)
    verbs = {c.argv(Path("/ws"))[0] for c in CASES}
    assert set(VERBS) <= verbs


@pytest.fixture(scope="module")
def pristine(tiny_corpus_shards, tmp_path_factory) -> Path:
    """Shards, a 2-step run (checkpoint step_00000002) and an empty dir, copied for each case."""
    ws = tmp_path_factory.mktemp("pristine")
    shutil.copytree(tiny_corpus_shards.shard_dir, ws / "shards")
    run_training(ws / "run", ws / "shards", **{"train.max_steps": 2, "train.warmup_steps": 1})
    (ws / "emptydir").mkdir()
    return ws


def snapshot(root: Path) -> dict[str, str]:
    """Every file's hash and every folder: a new empty folder (a run dir made too early) counts too."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(root.rglob("*"))}


@pytest.mark.slow
@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=c.marks) for c in CASES])
def test_bad_input_is_one_error_line_exit_2_and_changes_nothing(case: BadInput, pristine, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(pristine, ws)
    for setup in case.setup:
        setup(ws)
    before = snapshot(ws)
    result = subprocess.run([sys.executable, "-m", "lmforge.cli", *case.argv(ws)], cwd=REPO, env=run_env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in case.expected:
        assert fragment.format(ws=ws) in errors[0], errors[0]
    assert snapshot(ws) == before
