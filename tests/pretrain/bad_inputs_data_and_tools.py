"""Bad-input cases of issue 20 outside the launch checks: corpus readers and `prep shards` (no work
before judgement), tokenizer symbols, post-training meaning, generate / eval / import-hf. Run by
tests/pretrain/test_reliability_bad_inputs.py (each: exit 2, one error line, nothing new on disk)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from tests.pretrain.bad_input_catalogue import BadInput, write


def prep(verb: str, ws: Path, *inputs: str, output: str = "out", extra: tuple[str, ...] = ()) -> list[str]:
    tokenizer = ("--tokenizer", str(ws / "shards" / "tokenizer.model")) if verb == "shards" else ("--vocab-size", "300")
    return ["prep", verb, "--input", *(str(ws / i) for i in inputs), *tokenizer, "--output", str(ws / output), *extra]


def fifo(relative: str):
    def setup(ws: Path) -> None:
        (ws / relative).parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(ws / relative)
    return setup


def dangling_link(relative: str):
    def setup(ws: Path) -> None:
        (ws / relative).parent.mkdir(parents=True, exist_ok=True)
        (ws / relative).symlink_to(ws / "no-such-target.txt")
    return setup


def parquet(relative: str, column):
    def setup(ws: Path) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        (ws / relative).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"text": column}), ws / relative)
    return setup


def tied_config_with_its_own_head(ws: Path) -> None:
    """A transformers Llama whose config.json says tied, while model.safetensors holds a different lm_head."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(ws / "hf-tied")
    saved = json.loads((ws / "hf-tied" / "config.json").read_text())
    (ws / "hf-tied" / "config.json").write_text(json.dumps(saved | {"tie_word_embeddings": True}))


def prompt_run(ws: Path, verb: str, *sets: str) -> list[str]:
    args = [verb, "--set", f"init.from_run={ws / 'run'}", "--set", f"run.dir={ws / verb}"]
    for item in sets:
        args += ["--set", item]
    return args


PAIRS_SAME = '{"prompt": "a", "chosen": "b", "rejected": "b"}\n{"prompt": "c", "chosen": "d", "rejected": "d"}\n'
PAIRS = '{"prompt": "a", "chosen": "b", "rejected": "c"}\n'

READER_CASES = [
    # the examples
    BadInput("corpus-fifo-as-input", lambda ws: prep("tokenizer", ws, "pipe"), ("{ws}/pipe: a FIFO, not a regular file",),
             (fifo("pipe"),)),
    BadInput("corpus-dir-holding-only-a-fifo", lambda ws: prep("tokenizer", ws, "docs"), ("empty corpus",), (fifo("docs/pipe"),)),
    BadInput("corpus-dangling-symlink-as-input", lambda ws: prep("tokenizer", ws, "gone.txt"),
             ("{ws}/gone.txt: a dangling symlink, not a regular file",), (dangling_link("gone.txt"),)),
    BadInput("corpus-parquet-null", lambda ws: prep("tokenizer", ws, "d.parquet"), ("{ws}/d.parquet: row 2: 'text' is null",),
             (parquet("d.parquet", ["def f(): pass", None]),)),
    BadInput("corpus-parquet-integer-column", lambda ws: prep("tokenizer", ws, "n.parquet"),
             ("{ws}/n.parquet: column 'text' holds int64, not text",), (parquet("n.parquet", [1, 2, 3]),)),
    BadInput("prep-shards-bad-corpus-makes-no-output", lambda ws: prep("shards", ws, "latin1.py", output="new/out"),
             ("{ws}/latin1.py: byte 11: not valid UTF-8",), (write("latin1.py", b"x = 1\n# caf\xe9\n"),)),
    # beyond the issue
    BadInput("corpus-jsonl-integer-field", lambda ws: prep("tokenizer", ws, "n.jsonl"), ("{ws}/n.jsonl: line 1: 'text' is int, not a string",),
             (write("n.jsonl", '{"text": 7}\n'),)),
    BadInput("corpus-jsonl-null-field", lambda ws: prep("tokenizer", ws, "z.jsonl"), ("{ws}/z.jsonl: line 2: 'text' is null, not a string",),
             (write("z.jsonl", '{"text": "a"}\n{"text": null}\n'),)),
    BadInput("corpus-jsonl-not-an-object", lambda ws: prep("tokenizer", ws, "l.jsonl"), ("{ws}/l.jsonl: line 1: not a JSON object",),
             (write("l.jsonl", '["a"]\n'),)),
    BadInput("corpus-parquet-struct-column", lambda ws: prep("tokenizer", ws, "s.parquet"), ("column 'text' holds struct",),
             (parquet("s.parquet", [{"a": "x"}]),)),
    BadInput("prep-shards-empty-corpus-makes-no-output", lambda ws: prep("shards", ws, "empty.txt", output="made/here"),
             ("empty corpus",), (write("empty.txt", ""),)),
    BadInput("prep-shards-fifo-makes-no-output", lambda ws: prep("shards", ws, "pipe", output="made"),
             ("{ws}/pipe: a FIFO",), (fifo("pipe"),)),
]

TOKENIZER_CASES = [
    # the examples
    BadInput("tokenizer-user-symbol-is-eod", lambda ws: prep("tokenizer", ws, "a.py", extra=("--user-symbol", "</s>")),
             ("--user-symbol '</s>': already a special piece",), (write("a.py", "x = 1\n"),)),
    BadInput("tokenizer-user-symbol-with-a-space", lambda ws: prep("tokenizer", ws, "a.py", extra=("--user-symbol", "<|user turn|>")),
             ("--user-symbol '<|user turn|>': contains whitespace",), (write("a.py", "x = 1\n"),)),
    BadInput("tokenizer-empty-user-symbol", lambda ws: prep("tokenizer", ws, "a.py", extra=("--user-symbol", "")),
             ("--user-symbol '': empty",), (write("a.py", "x = 1\n"),)),
    # beyond the issue
    BadInput("tokenizer-control-symbol-is-pad", lambda ws: prep("tokenizer", ws, "a.py", extra=("--control-symbol", "<pad>")),
             ("--control-symbol '<pad>': already a special piece",), (write("a.py", "x = 1\n"),)),
    BadInput("tokenizer-symbol-twice", lambda ws: prep("tokenizer", ws, "a.py", extra=("--user-symbol", "<x>", "--control-symbol", "<x>")),
             ("--control-symbol '<x>': given twice (also as --user-symbol)",), (write("a.py", "x = 1\n"),)),
    BadInput("tokenizer-symbol-a-byte-piece", lambda ws: prep("tokenizer", ws, "a.py", extra=("--user-symbol", "<0x41>")),
             ("--user-symbol '<0x41>': is a byte piece name",), (write("a.py", "x = 1\n"),)),
    BadInput("tokenizer-symbol-with-a-newline", lambda ws: prep("tokenizer", ws, "a.py", extra=("--user-symbol", "a\nb")),
             ("contains whitespace",), (write("a.py", "x = 1\n"),)),
]

POSTTRAIN_CASES = [
    # the examples
    BadInput("ppo-reward-run-is-a-language-model", lambda ws: prompt_run(ws, "ppo", f"ppo.reward_run={ws / 'run'}",
                                                                         f"data.train={ws / 'prompts.jsonl'}"),
             ("ppo.reward_run = {ws}/run: a 'train' run, not a reward model",), (write("prompts.jsonl", '{"prompt": "a"}\n'),)),
    BadInput("reward-pairs-never-differ", lambda ws: prompt_run(ws, "reward", f"data.train={ws / 'same.jsonl'}"),
             ('{ws}/same.jsonl: "chosen" equals "rejected" in every one of its',), (write("same.jsonl", PAIRS_SAME),)),
    BadInput("ppo-reward-function-wrong-signature", lambda ws: prompt_run(ws, "ppo", "ppo.reward_run=null",
                                                                          "ppo.reward_function=os.path:basename",
                                                                          f"data.train={ws / 'prompts.jsonl'}"),
             ("ppo.reward_function = 'os.path:basename': cannot be called as basename(prompts, responses)",),
             (write("prompts.jsonl", '{"prompt": "a"}\n'),)),
    # beyond the issue
    BadInput("dpo-pairs-never-differ", lambda ws: prompt_run(ws, "dpo", f"data.train={ws / 'same.jsonl'}"),
             ('"chosen" equals "rejected" in every one of its',), (write("same.jsonl", PAIRS_SAME),)),
    BadInput("ppo-reward-function-not-callable", lambda ws: prompt_run(ws, "ppo", "ppo.reward_run=null", "ppo.reward_function=math:pi",
                                                                       f"data.train={ws / 'prompts.jsonl'}"),
             ("ppo.reward_function = 'math:pi': not a function",), (write("prompts.jsonl", '{"prompt": "a"}\n'),)),
    BadInput("ppo-monitor-function-wrong-signature", lambda ws: prompt_run(ws, "ppo", "ppo.reward_run=null",
                                                                           "ppo.reward_function=digit_fraction",
                                                                           "ppo.monitor_function=json:dumps",
                                                                           f"data.train={ws / 'prompts.jsonl'}"),
             ("ppo.monitor_function = 'json:dumps': cannot be called as dumps(prompts, responses)",),
             (write("prompts.jsonl", '{"prompt": "a"}\n'),)),
    BadInput("sft-misspelt-deepspeed-key", lambda ws: prompt_run(ws, "sft", f"data.train={ws / 'sft.jsonl'}",
                                                                 f"deepspeed.config={ws / 'typo.json'}"),
             ("{ws}/typo.json: unknown key 'zero_optimisation'",),
             (write("sft.jsonl", '{"prompt": "a", "response": "b"}\n'), write("typo.json", '{"zero_optimisation": {"stage": 1}}'))),
    BadInput("ppo-reward-run-without-checkpoint", lambda ws: prompt_run(ws, "ppo", f"ppo.reward_run={ws / 'emptydir'}",
                                                                        f"data.train={ws / 'prompts.jsonl'}"),
             ("{ws}/emptydir",), (write("prompts.jsonl", '{"prompt": "a"}\n'),)),
]

TOOL_CASES = [
    # the examples
    BadInput("generate-prompt-beyond-the-context", lambda ws: ["generate", "--checkpoint", str(ws / "run"), "--prompt", "7" * 300],
             ("--prompt: 301 tokens (with the start-of-document token) is longer than the model's context of 128",)),
    BadInput("generate-prompt-fills-the-context", lambda ws: ["generate", "--checkpoint", str(ws / "run"), "--prompt", "7" * 127],
             ("--prompt: 128 tokens (with the start-of-document token) fills the model's context of 128",)),
    BadInput("eval-batch-size-zero", lambda ws: ["eval", "--checkpoint", str(ws / "run"), "--batch-size", "0"],
             ("--batch-size 0: must be at least 1",)),
    BadInput("import-hf-tied-config-with-another-head", lambda ws: ["import-hf", "--model", str(ws / "hf-tied"), "--output", str(ws / "imp")],
             ("{ws}/hf-tied: config.json says tie_word_embeddings = true, but its lm_head.weight differs",),
             (tied_config_with_its_own_head,)),
    # beyond the issue
    BadInput("eval-seq-len-zero", lambda ws: ["eval", "--checkpoint", str(ws / "run"), "--seq-len", "0"], ("--seq-len 0: must be at least 1",)),
    BadInput("eval-output-is-a-folder", lambda ws: ["eval", "--checkpoint", str(ws / "run"), "--output", str(ws / "emptydir")],
             ("--output {ws}/emptydir: a directory",)),
    BadInput("generate-temperature-inf", lambda ws: ["generate", "--checkpoint", str(ws / "run"), "--temperature", "inf"],
             ("--temperature inf", "expected temperature >= 0")),
    BadInput("generate-top-p-nan", lambda ws: ["generate", "--checkpoint", str(ws / "run"), "--top-p", "nan"], ("--top-p nan",)),
]

DATA_AND_TOOL_CASES = READER_CASES + TOKENIZER_CASES + POSTTRAIN_CASES + TOOL_CASES
