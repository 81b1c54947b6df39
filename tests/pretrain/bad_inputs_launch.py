"""Bad-input cases of the launch checks (issue 20): DeepSpeed JSONs judged by DeepSpeed's own models in
`train` and `preflight` alike, duplicate keys, numbers the optimiser cannot mean, and configs that
train but can never be used. Run by tests/pretrain/test_reliability_bad_inputs.py."""
from __future__ import annotations

import json
from pathlib import Path

from tests.pretrain.bad_input_catalogue import BadInput, train, write


def ds(name: str, config: dict | str | bytes):
    """A case's DeepSpeed JSON at ws/NAME.json (str or bytes are written as they are) and the --set naming it."""
    text = config if isinstance(config, (str, bytes)) else json.dumps(config)
    return write(f"{name}.json", text), (lambda ws: f"deepspeed.config={ws / (name + '.json')}")


def train_ds(name: str, config: dict | str | bytes, expected: tuple[str, ...], *sets: str) -> BadInput:
    setup, option = ds(name, config)
    return BadInput(f"ds-{name}", lambda ws: train(ws, option(ws), *sets), expected, (setup,))


def preflight(ws: Path, *sets: str) -> list[str]:
    args = ["preflight", "--set", f"data.path=[{ws / 'shards'}]", "--set", f"run.dir={ws / 'newrun'}"]
    for item in sets:
        args += ["--set", item]
    return args


DS_CASES = [
    # the examples
    train_ds("bf16-not-an-object", {"bf16": True}, ("{ws}/bf16-not-an-object.json: bf16 = True: expected an object",)),
    train_ds("optimizer-a-string", {"optimizer": "AdamW"}, ("optimizer = 'AdamW': expected an object like {{\"type\": \"AdamW\"}}",)),
    train_ds("stage-three", {"zero_optimization": {"stage": "three"}},
             ("zero_optimization.stage = 'three': expected 0, 1, 2 or 3",)),
    train_ds("stage-7", {"zero_optimization": {"stage": 7}}, ("zero_optimization.stage = 7: expected 0, 1, 2 or 3",)),
    train_ds("nvme-without-path", {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}},
             ("zero_optimization.offload_param.device = 'nvme' needs zero_optimization.offload_param.nvme_path",)),
    train_ds("misspelt-top-level-key", {"zero_optimisation": {"stage": 3}},
             ("unknown key 'zero_optimisation' (DeepSpeed would ignore it); did you mean 'zero_optimization'?",)),
    train_ds("duplicate-key", '{"zero_optimization": {"stage": 1}, "zero_optimization": {"stage": 3}}',
             ("{ws}/duplicate-key.json: key 'zero_optimization' appears twice",)),
    # beyond the issue
    train_ds("misspelt-zero-key", {"zero_optimization": {"stage": 2, "overlap_com": True}},
             ("unknown key 'zero_optimization.overlap_com'", "did you mean 'overlap_comm'?")),
    train_ds("misspelt-offload-key", {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu", "pin_memry": True}}},
             ("unknown key 'zero_optimization.offload_param.pin_memry'", "did you mean 'pin_memory'?")),
    train_ds("misspelt-bf16-key", {"bf16": {"enable": True}}, ("unknown key 'bf16.enable'", "did you mean 'enabled'?")),
    train_ds("misspelt-scheduler-key", {"scheduler": {"type": "WarmupCosineLR", "parms": {}}},
             ("unknown key 'scheduler.parms'", "did you mean 'params'?")),
    train_ds("bucket-size-zero", {"zero_optimization": {"stage": 2, "reduce_bucket_size": 0}},
             ("zero_optimization.reduce_bucket_size = 0: input should be greater than 0",)),
    train_ds("offload-a-string", {"zero_optimization": {"stage": 3, "offload_param": "cpu"}},
             ("zero_optimization.offload_param = 'cpu'",)),
    train_ds("offload-device-unknown", {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "gpu"}}},
             ("zero_optimization.offload_optimizer.device = 'gpu'",)),
    train_ds("stage-a-float", {"zero_optimization": {"stage": 2.5}}, ("zero_optimization.stage = 2.5: expected 0, 1, 2 or 3",)),
    train_ds("autocast-not-a-bool", {"torch_autocast": {"enabled": "yes"}}, ("torch_autocast.enabled = 'yes': expected true, false",)),
    train_ds("activation-checkpoints-negative", {"activation_checkpointing": {"number_checkpoints": -2}},
             ("activation_checkpointing.number_checkpoints = -2: expected a positive integer",)),
    train_ds("scheduler-params-a-list", {"scheduler": {"type": "WarmupCosineLR", "params": [1]}},
             ("scheduler.params = [1]: expected an object",)),
    train_ds("not-utf8", b'{"bf16": "\xff"}', ("{ws}/not-utf8.json: byte",)),
    train_ds("duplicate-nested-key", '{"zero_optimization": {"stage": 1, "stage": 3}}', ("key 'stage' appears twice",)),
]


def _preflight_ds(name: str, config: dict, expected: tuple[str, ...]) -> BadInput:
    setup, option = ds(name, config)
    return BadInput(f"preflight-ds-{name}", lambda ws: preflight(ws, option(ws)), expected, (setup,))


PREFLIGHT_CASES = [  # the same checks as train's, and no run.dir made after a refusal
    _preflight_ds("misspelt-top-level-key", {"zero_optimisation": {"stage": 3}}, ("did you mean 'zero_optimization'?",)),
    _preflight_ds("stage-three", {"zero_optimization": {"stage": "three"}}, ("zero_optimization.stage = 'three'",)),
    BadInput("preflight-vocab-mismatch-no-run-dir", lambda ws: preflight(ws, "model.vocab_size=1000"),
             ("model.vocab_size = 1000 but the tokenizer of data.path has 512 tokens",)),
    BadInput("preflight-nan-lr", lambda ws: preflight(ws, "train.lr=.nan"), ("train.lr = nan: expected a finite number",)),
    BadInput("preflight-cuda-graphs-of-one-block", lambda ws: preflight(ws, "train.compile=true", "train.compile_scope=blocks",
                                                                         "train.compile_mode=reduce-overhead"),
             ("train.compile_mode = reduce-overhead: not supported with train.compile_scope = blocks",)),
]


def _yaml(name: str, text: str, expected: tuple[str, ...]) -> BadInput:
    return BadInput(f"config-{name}", lambda ws: ["train", "--config", str(ws / f"{name}.yaml")], expected,
                    (write(f"{name}.yaml", text),))


NUMBER_CASES = [
    # the examples
    BadInput("config-beta1-above-1", lambda ws: train(ws, "train.beta1=1.5"), ("train.beta1 = 1.5: must be in [0, 1)",)),
    BadInput("config-adam-eps-negative", lambda ws: train(ws, "train.adam_eps=-1"), ("train.adam_eps = -1.0: must be positive",)),
    BadInput("config-grad-clip-nan", lambda ws: train(ws, "train.grad_clip=.nan"), ("train.grad_clip = nan: expected a finite number",)),
    BadInput("config-lr-inf", lambda ws: train(ws, "train.lr=.inf"), ("train.lr = inf: expected a finite number",)),
    BadInput("config-seed-beyond-64-bits", lambda ws: train(ws, f"train.seed={2**64}"),
             (f"train.seed = {2**64}: must be in [0, 2**63)",)),
    # beyond the issue
    BadInput("config-seed-negative", lambda ws: train(ws, "train.seed=-1"), ("train.seed = -1: must be in [0, 2**63)",)),
    BadInput("config-beta2-exactly-1", lambda ws: train(ws, "train.beta2=1"), ("train.beta2 = 1.0: must be in [0, 1)",)),
    BadInput("config-beta1-negative", lambda ws: train(ws, "train.beta1=-0.1"), ("train.beta1 = -0.1: must be in [0, 1)",)),
    BadInput("config-adam-eps-zero", lambda ws: train(ws, "train.adam_eps=0"), ("train.adam_eps = 0.0: must be positive",)),
    BadInput("config-lr-zero", lambda ws: train(ws, "train.lr=0", "train.min_lr=0"), ("train.lr = 0.0: must be positive",)),
    BadInput("config-lr-nan-string", lambda ws: train(ws, "train.lr=nan"), ("train.lr = 'nan': expected a finite number",)),
    BadInput("config-weight-decay-negative", lambda ws: train(ws, "train.weight_decay=-0.1"),
             ("train.weight_decay = -0.1: must not be negative",)),
    BadInput("config-grad-clip-negative", lambda ws: train(ws, "train.grad_clip=-1"), ("train.grad_clip = -1.0: must not be negative",)),
    BadInput("config-min-lr-inf", lambda ws: train(ws, "train.min_lr=.inf"), ("train.min_lr = inf: expected a finite number",)),
    BadInput("config-dropout-nan", lambda ws: train(ws, "model.dropout=.nan"), ("model.dropout = nan: expected a finite number",)),
    BadInput("config-blend-weight-inf", lambda ws: train(ws, f"data.path=[{ws / 'shards'}]", "data.weights=[.inf]"),
             ("data.weights = [inf]: expected a finite number",)),
    BadInput("ppo-temperature-inf", lambda ws: ["ppo", "--set", f"init.from_run={ws / 'run'}", "--set", "ppo.reward_run=null",
                                                "--set", "ppo.reward_function=digit_fraction", "--set", "ppo.temperature=.inf",
                                                "--set", f"run.dir={ws / 'ppo'}"],
             ("ppo.temperature = inf: expected a finite number",)),
    BadInput("dpo-beta-nan", lambda ws: ["dpo", "--set", f"init.from_run={ws / 'run'}", "--set", "dpo.beta=.nan",
                                         "--set", f"run.dir={ws / 'dpo'}"], ("dpo.beta = nan: expected a finite number",)),
    # duplicate keys in YAML
    _yaml("duplicate-key", "train:\n  lr: 0.1\n  lr: 0.2\n", ("duplicate-key.yaml (line 3): not valid YAML: key 'lr' appears twice",)),
    _yaml("duplicate-section", "train:\n  lr: 0.1\ntrain:\n  max_steps: 3\n", ("key 'train' appears twice",)),
    # trains, but could never be exported
    BadInput("config-gpt2-with-gqa", lambda ws: train(ws, "model.arch=gpt2"),
             ("model.n_kv_heads = 2: a gpt2 model has one key/value head per query head",)),
]

LAUNCH_CASES = DS_CASES + PREFLIGHT_CASES + NUMBER_CASES
