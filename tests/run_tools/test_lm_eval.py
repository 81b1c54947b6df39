"""lm-evaluation-harness on an exported run: offline local tasks give lmforge's own log-likelihoods.

lm-eval is an optional extra (`pip install lmforge[eval]`); without it these tests are skipped.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="lm-eval is an optional extra: pip install 'lm-eval[hf]'")

from data_prep.tokenizer import Tokenizer  # noqa: E402
from run_tools import export_hf  # noqa: E402
from run_tools.run_config import load_checked_model  # noqa: E402
from tests.pretrain.training_runs import run_training  # noqa: E402

pytestmark = pytest.mark.slow

# Short documents (one lm-eval window each) with the text a tokenizer can get wrong.
DOCUMENTS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\r\n\tdef __init__(self, x):\r\n\t\tself.x = x\r\n",
    "# 注释: emoji 😀 in a comment\nprint('héllo wörld')\n",
    "import os\nimport sys\n\nprint(sys.argv)\n",
]
QUESTIONS = [
    {"question": "def f(x):\n    return", "choices": ["x", "import", "class"], "answer": 0},
    {"question": "import", "choices": ["os", "def", ")"], "answer": 0},
    {"question": "for i in", "choices": ["range(10):", "class", "return"], "answer": 0},
    {"question": "if __name__ ==", "choices": ["'__main__':", "\t42", "😀"], "answer": 0},
]
ROLLING_TASK = """task: lmforge_local_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: bits_per_byte
  - metric: byte_perplexity
"""
CHOICE_TASK = """task: lmforge_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def write_tasks(folder: Path) -> None:
    folder.mkdir()
    (folder / "text.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))
    (folder / "choice.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / "text.yaml").write_text(ROLLING_TASK.format(data=folder / "text.jsonl"))
    (folder / "choice.yaml").write_text(CHOICE_TASK.format(data=folder / "choice.jsonl"))


@pytest.fixture(scope="module")
def harness(tmp_path_factory, tiny_corpus_shards):
    """A gpt2 run with a padded vocab, exported, then evaluated by `python -m lm_eval` fully offline."""
    root = tmp_path_factory.mktemp("lm_eval")
    run_dir, model_dir = root / "run", root / "hf"
    run_training(run_dir, tiny_corpus_shards.shard_dir, nproc=1, **{
        "deepspeed.config": "ds_configs/zero0.json", "model.arch": "gpt2", "model.n_kv_heads": "null",
        "model.pad_vocab_to_multiple": 96, "train.max_steps": 40, "train.lr": 0.01, "train.warmup_steps": 4})
    export_hf.export(run_dir, model_dir)
    write_tasks(root / "tasks")
    tokenizer = Tokenizer.load(tiny_corpus_shards.shard_dir / "tokenizer.model")
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(root / "hf_home"),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={model_dir},dtype=float32,prefix_token_id={tokenizer.eod_id}",
           "--device", "cpu", "--batch_size", "4", "--tasks", "lmforge_local_text,lmforge_local_choice",
           "--include_path", str(root / "tasks"), "--output_path", str(root / "results"), "--log_samples"]
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    (results_file,) = root.glob("results/*/results_*.json")
    samples = {task: [json.loads(line) for line in next(root.glob(f"results/*/samples_{task}_*.jsonl")).read_text().splitlines()]
               for task in ("lmforge_local_text", "lmforge_local_choice")}
    model, _, _ = load_checked_model(run_dir)
    return {"results": json.loads(results_file.read_text())["results"], "samples": samples, "model": model,
            "tokenizer": tokenizer}


def log_likelihood(model, context: list[int], continuation: list[int]) -> float:
    """log p(continuation | context) under lmforge's model, softmax over the padded vocab as HF computes it."""
    tokens = torch.tensor([context + continuation])
    with torch.no_grad():
        log_probs = torch.log_softmax(model.lm_head(model.hidden_states(tokens[:, :-1])).double(), dim=-1)[0]
    targets = tokens[0, 1:]
    picked = log_probs.gather(-1, targets[:, None])[:, 0]
    return float(picked[len(context) - 1 :].sum())


def test_lm_eval_bits_per_byte_equals_lmforge_log_likelihood(harness):
    model, tokenizer = harness["model"], harness["tokenizer"]
    ours = [log_likelihood(model, [tokenizer.eod_id], tokenizer.encode(doc)) for doc in DOCUMENTS]
    total_bytes = sum(len(doc.encode("utf-8")) for doc in DOCUMENTS)
    expected_bpb = -sum(ours) / total_bytes / math.log(2)
    metrics = harness["results"]["lmforge_local_text"]
    assert metrics["bits_per_byte,none"] == pytest.approx(expected_bpb, rel=1e-5)
    assert metrics["byte_perplexity,none"] == pytest.approx(2 ** expected_bpb, rel=1e-5)
    by_doc = {s["doc"]["text"]: float(s["resps"][0][0]) for s in harness["samples"]["lmforge_local_text"]}
    for doc, value in zip(DOCUMENTS, ours):
        assert by_doc[doc] == pytest.approx(value, abs=1e-3)


def test_lm_eval_multiple_choice_scores_equal_lmforge_log_likelihoods(harness):
    model, tokenizer = harness["model"], harness["tokenizer"]
    correct = 0
    for question in QUESTIONS:
        context = tokenizer.encode(question["question"])
        scores = []
        for choice in question["choices"]:  # lm-eval: continuation = tokens of (context + " " + choice) after the context's
            whole = tokenizer.encode(question["question"] + " " + choice)
            assert whole[: len(context)] == context
            scores.append(log_likelihood(model, context, whole[len(context):]))
        sample = next(s for s in harness["samples"]["lmforge_local_choice"] if s["doc"]["question"] == question["question"])
        assert [float(r[0][0]) for r in sample["resps"]] == pytest.approx(scores, abs=1e-3)
        correct += int(max(range(len(scores)), key=scores.__getitem__) == question["answer"])
    assert harness["results"]["lmforge_local_choice"]["acc,none"] == pytest.approx(correct / len(QUESTIONS))
