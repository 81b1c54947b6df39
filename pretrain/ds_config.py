"""The one place where lmforge's YAML values reach DeepSpeed's JSON.

`ds_configs/*.json` are DeepSpeed's own format. `build_deepspeed_config` fills in what DeepSpeed
must agree on with our `train` section, and refuses a JSON that says something different; the
two other sections lmforge writes are here too: `pipeline` (`with_pipeline`, from the `parallel`
section) and `checkpoint.load_universal` (`with_universal_loading`, a resume on other ranks); the
`tensor_parallel` section (autotp_size and AutoTP's layer specs) is filled from `parallel.tensor`
by `parallel.tensor.with_tensor_parallel`, called next to `with_pipeline` in pretrain.run_checks:

| DeepSpeed key                         | filled from                                   |
| ------------------------------------- | --------------------------------------------- |
| train_micro_batch_size_per_gpu        | train.micro_batch_size                        |
| gradient_accumulation_steps           | train.grad_accum_steps                        |
| train_batch_size                      | micro × accumulation × data-parallel ranks (world / (pipeline × tensor)) |
| gradient_clipping                     | train.grad_clip                               |
| optimizer (AdamW) params              | train.lr, beta1, beta2, adam_eps, weight_decay |
| scheduler (WarmupCosineLR) params     | train.max_steps, warmup_steps, min_lr / lr (`warmup_cosine_params`) |
| bf16.enabled = "auto"                 | true where the device trains in bf16 (GPU), else false |
| torch_autocast.enabled = "auto"       | the same: bf16 autocast over fp32 weights on GPU, fp32 on CPU |
| steps_per_print, wall_clock_breakdown | unless the JSON sets them: 10**9 and false (lmforge logs itself) |
| timers.throughput.enabled             | unless the JSON has `timers`: false (see below) |
| torch_autocast.lower_precision_safe_modules | unless the JSON sets it, at ZeRO 0-2: [] (gradients reduced in fp32, see below) |

The shipped ZeRO JSONs use `torch_autocast` rather than DeepSpeed's `bf16` mode: on one H200 it
ran 1.6× (ZeRO-0) and 1.4× (ZeRO-2) faster for GPT-2 124M (docs/performance.md), because the bf16
optimizer's per-parameter overflow checks synchronise the host with the GPU every step.

DeepSpeed's throughput timer, on by default, calls `torch.cuda.synchronize()` when each forward starts
and each optimizer step ends, to time them: two host waits for the GPU per step that stop the host from
queuing the next step while the GPU runs this one. lmforge measures throughput itself, so it is off
unless the JSON has a `timers` section: the real loop of gpt2-124m on one H200 went from 0.96x to
1.01x a plain PyTorch script with it off (docs/performance.md).

Under `torch_autocast`, DeepSpeed marks every `nn.Linear` weight to be reduced in the autocast dtype:
ZeRO 1-3 and ZeRO-0's all-reduce cast those fp32 gradients to bf16 and back, even on one rank, so the
optimizer steps on rounded gradients (the GPU parity run's final valid loss was 0.17% worse than a
plain PyTorch loop's on every one of four seeds; docs/parity.md). lmforge writes an empty
`lower_precision_safe_modules` unless the JSON names one: every gradient is reduced in its parameter's
dtype (fp32), as Megatron does for bf16. A JSON that lists modules gets DeepSpeed's bf16 reduction back
(half the gradient bytes on the wire at more ranks). ZeRO-3 keeps DeepSpeed's default: there the mark
also sets the dtype its all-gathers of the weights use, and the DeepCompile loop row with fp32 marks
failed on the H200 (`aten._scaled_dot_product_cudnn_attention`: expected Tensor), not yet separated from
other causes (docs/performance.md).

A key the JSON already holds with a different value is an error naming both places. "auto" is
accepted for any filled key.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from pretrain.config import TrainConfig

AUTO = "auto"


class _DuplicateKey(Exception):
    pass


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def read_deepspeed_json(path: Path) -> dict[str, Any]:
    """DeepSpeed's JSON at `path` as a dict; a missing file, bad JSON, a duplicate key or a non-object is one line."""
    if not path.is_file():
        raise LmforgeError(f"deepspeed.config = {path}: file not found (the JSONs live in ds_configs/)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_refuse_duplicate_keys)
    except json.JSONDecodeError as err:
        raise LmforgeError(f"{path}: not valid JSON (line {err.lineno}: {err.msg})") from None
    except _DuplicateKey as err:
        raise LmforgeError(f"{path}: key {err.args[0]!r} appears twice in one object (JSON keeps only the last); remove one") from None
    except UnicodeDecodeError as err:
        raise LmforgeError(f"{path}: byte {err.start}: not valid UTF-8; expected a JSON file") from None
    if not isinstance(data, dict):
        raise LmforgeError(f"{path}: expected a JSON object of DeepSpeed settings")
    return data


def _fill(config: dict, key: str, value: Any, yaml_key: str, source: Path, problems: list[str], where: str = "") -> None:
    current = config.get(key, AUTO)
    if current == AUTO or current is None:
        config[key] = value
    elif isinstance(value, float) and isinstance(current, (int, float)) and abs(current - value) <= 1e-12 * max(1.0, abs(value)):
        config[key] = value
    elif current != value and not (isinstance(current, list) and list(value) == current):
        problems.append(f"{source}: {where}{key} = {current!r} contradicts {yaml_key} = {value!r}; remove it from the JSON or make them agree")


def warmup_cosine_params(train: TrainConfig) -> dict[str, Any]:
    """WarmupCosineLR's parameters for lmforge's schedule (docs/parity.md), with W = warmup_steps, T = max_steps:

    step 1 at lr 0; step k <= W at lr * (k - 1) / W; step k > W on the cosine from lr to min_lr,
    at progress (k - W) / (T - W), so step T runs at min_lr. DeepSpeed's scheduler runs the first
    step at lr 0 whatever its values (it applies its first ratio only after one step), and for
    W <= 2 its warmup lasts two steps (steps 2-3 at lr, or at lr/2 and 3lr/4 for W = 2, then
    the cosine at progress (k - 3) / (T - 3)). Its step() after optimizer step k sets the lr of
    step k + 1 from iteration k - 1, hence the shifted values below.
    """
    w = train.warmup_steps
    if w >= 3:
        warmup_num_steps, warmup_min_ratio = w - 1, 1.0 / w
    else:  # DeepSpeed's minimum of two warmup steps
        warmup_num_steps, warmup_min_ratio = 2, (0.5 if w == 2 else 1.0)
    return {
        "total_num_steps": max(1, train.max_steps - 1),
        "warmup_num_steps": warmup_num_steps,
        "warmup_min_ratio": warmup_min_ratio,
        "cos_min_ratio": train.min_lr / train.lr,
        "warmup_type": "linear",
    }


def build_deepspeed_config(path: Path, train: TrainConfig, data_parallel_size: int, bf16_supported: bool) -> dict[str, Any]:
    """DeepSpeed's JSON at `path` with our values filled in (see the table above)."""
    source = path
    config = copy.deepcopy(read_deepspeed_json(path))
    problems: list[str] = []
    _fill(config, "train_micro_batch_size_per_gpu", train.micro_batch_size, "train.micro_batch_size", source, problems)
    _fill(config, "gradient_accumulation_steps", train.grad_accum_steps, "train.grad_accum_steps", source, problems)
    global_batch = train.micro_batch_size * train.grad_accum_steps * data_parallel_size
    _fill(config, "train_batch_size", global_batch,
          f"train.micro_batch_size × train.grad_accum_steps × {data_parallel_size} ranks", source, problems)
    _fill(config, "gradient_clipping", float(train.grad_clip), "train.grad_clip", source, problems)

    optimizer = config.setdefault("optimizer", {"type": "AdamW"})
    if str(optimizer.get("type", "AdamW")).lower() not in ("adamw", "adam"):
        problems.append(f"{source}: optimizer.type = {optimizer.get('type')!r}: lmforge trains with AdamW or Adam")
    optimizer.setdefault("type", "AdamW")
    params = optimizer.setdefault("params", {})
    _fill(params, "lr", train.lr, "train.lr", source, problems, "optimizer.params.")
    _fill(params, "betas", [train.beta1, train.beta2], "train.beta1/beta2", source, problems, "optimizer.params.")
    _fill(params, "eps", train.adam_eps, "train.adam_eps", source, problems, "optimizer.params.")
    _fill(params, "weight_decay", train.weight_decay, "train.weight_decay", source, problems, "optimizer.params.")

    scheduler = config.setdefault("scheduler", {"type": "WarmupCosineLR"})
    if scheduler.get("type", "WarmupCosineLR") != "WarmupCosineLR":
        problems.append(f"{source}: scheduler.type = {scheduler.get('type')!r}: lmforge uses WarmupCosineLR (set train.warmup_steps, train.min_lr instead)")
    scheduler.setdefault("type", "WarmupCosineLR")
    sched = scheduler.setdefault("params", {})
    how = "train.warmup_steps and train.max_steps (docs/parity.md: the schedule)"
    for key, value in warmup_cosine_params(train).items():
        _fill(sched, key, value, how if key != "cos_min_ratio" else "train.min_lr / train.lr", source, problems, "scheduler.params.")

    bf16 = config.get("bf16", {})
    if bf16.get("enabled") == AUTO:
        bf16["enabled"] = bf16_supported
    fp16 = config.get("fp16", {})
    if fp16.get("enabled") == AUTO:
        fp16["enabled"] = False
    autocast = config.get("torch_autocast", {})
    if autocast.get("enabled") == AUTO:
        autocast["enabled"] = bf16_supported
    if autocast.get("enabled") and (bf16.get("enabled") or fp16.get("enabled")):
        problems.append(f"{source}: torch_autocast.enabled with bf16/fp16.enabled: choose one precision mode")
    if fp16.get("enabled") and not bf16.get("enabled") and not _fp16_device_available():  # both: "choose one" says it
        problems.append(f"{source}: fp16.enabled = true, but DeepSpeed trains in fp16 only on GPUs and this machine has none; use a bf16 or fp32 JSON here")
    if bf16.get("enabled") and fp16.get("enabled"):
        problems.append(f"{source}: bf16.enabled and fp16.enabled are both true; choose one")
    config.setdefault("steps_per_print", 10**9)  # we log ourselves
    config.setdefault("wall_clock_breakdown", False)
    config.setdefault("timers", {"throughput": {"enabled": False}})  # its device syncs: see the docstring
    if autocast.get("enabled") and zero_stage_of(config) < 3:
        autocast.setdefault("lower_precision_safe_modules", [])  # fp32 gradient reduction: see the docstring
    if problems:
        raise LmforgeError("\n".join(problems))  # one `error:` line each
    return config


def _fp16_device_available() -> bool:
    import torch

    return torch.cuda.is_available()


def precision_of(ds_config: dict[str, Any]) -> str:
    """'bf16', 'fp16', 'autocast-bf16' or 'fp32': how DeepSpeed runs the model's arithmetic."""
    if ds_config.get("torch_autocast", {}).get("enabled"):
        return "autocast-" + str(ds_config["torch_autocast"].get("dtype", "bfloat16")).replace("bfloat16", "bf16")
    if ds_config.get("bf16", {}).get("enabled"):
        return "bf16"
    if ds_config.get("fp16", {}).get("enabled"):
        return "fp16"
    return "fp32"


def zero_stage_of(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def activation_checkpoint_every(ds_config: dict[str, Any], n_layers: int) -> int | None:
    """Checkpoint every k-th block, or None when the JSON has no activation_checkpointing section.

    DeepSpeed's `number_checkpoints` (how many checkpoints the forward pass stores) picks k:
    absent means every block; K means K blocks spread evenly (k = ceil(n_layers / K)).
    """
    section = ds_config.get("activation_checkpointing")
    if section is None:
        return None
    count = section.get("number_checkpoints")
    if not count:
        return 1
    return max(1, -(-n_layers // int(count)))


def offloads_to_host(ds_config: dict[str, Any]) -> bool:
    """True when ZeRO offloads the optimizer states or the parameters (to the CPU or NVMe)."""
    zero = ds_config.get("zero_optimization") or {}
    return any((zero.get(key) or {}).get("device", "none") not in ("none", None) for key in ("offload_optimizer", "offload_param"))


def checkpoint_writer_of(choice: str, ds_config: dict[str, Any]) -> str:
    """train.checkpoint_writer resolved: "auto" is "background" unless an offload holds the states on
    the host already (a host copy of them would double the host memory that limits such runs) or
    the JSON picks DeepSpeed's own writer (`checkpoint.writer`)."""
    if choice != "auto":
        return choice
    ds_writer = (ds_config.get("checkpoint") or {}).get("writer")
    return "blocking" if offloads_to_host(ds_config) or ds_writer else "background"


def checkpoint_writer_problems(choice: str, ds_config: dict[str, Any], source: Path) -> list[str]:
    if choice == "background" and (ds_config.get("checkpoint") or {}).get("writer"):
        return [f"train.checkpoint_writer = background: {source} sets checkpoint.writer (DeepSpeed's own writer), which "
                "the background writer would replace; remove one of them (or set train.checkpoint_writer to auto)"]
    return []


def optimizer_json_problems(optimizer: str, ds_config: dict[str, Any], source: Path, pipeline_stages: int) -> list[str]:
    """train.optimizer = adamw8bit (numerics/adamw8bit.py) steps bf16 weights itself at ZeRO-0: one line
    when DeepSpeed's JSON asks for another stage, mixed precision (even "auto"), an offload or pipeline stages."""
    if optimizer != "adamw8bit":
        return []
    stage = zero_stage_of(ds_config)
    wrong = [f"zero_optimization.stage = {stage}"] if stage else []
    wrong += [f"{key}.enabled" for key in ("bf16", "fp16", "torch_autocast") if (ds_config.get(key) or {}).get("enabled") not in (None, False)]
    wrong += ["an offload"] if offloads_to_host(ds_config) else []
    wrong += ["pipeline stages (parallel.pipeline_stages)"] if pipeline_stages > 1 else []
    if not wrong:
        return []
    return [f"train.optimizer = 'adamw8bit' runs at ZeRO-0 on bf16 weights, without mixed precision or offload, "
            f"but {source} has {', '.join(wrong)}; use ds_configs/zero0_adamw8bit.json"]


def guards_on_device(ds_config: dict[str, Any]) -> bool:
    """True when pretrain.guarded_step guards a step on the device, with no host synchronisation:
    torch's fused Adam/AdamW (`"torch_adam": true, "fused": true`), bf16 autocast or fp32 (no loss
    scaler), no offload, no pipeline, no tensor parallelism, and at ZeRO-0 no DeepSpeed bf16 optimizer wrapper."""
    optimizer = ds_config.get("optimizer") or {}
    params = optimizer.get("params") or {}
    if str(optimizer.get("type", "")).lower() not in ("adam", "adamw") or not (params.get("torch_adam") and params.get("fused")):
        return False
    offloaded = offloads_to_host(ds_config)
    precision = precision_of(ds_config)
    loss_scaled = precision == "fp16" or (precision.startswith("autocast-") and precision != "autocast-bf16")
    pipelined = int((ds_config.get("pipeline") or {}).get("stages", 1) or 1) > 1
    # lmforge's own ZeRO-0 clipping sees only this rank's shards; DeepSpeed's norm spans the tensor group.
    tensor_parallel = int((ds_config.get("tensor_parallel") or {}).get("autotp_size", 0) or 0) > 1
    bf16_wrapper = precision == "bf16" and zero_stage_of(ds_config) == 0
    return not (offloaded or loss_scaled or pipelined or tensor_parallel or bf16_wrapper)


def with_pipeline(ds_config: dict[str, Any], stages: int, partition: str) -> dict[str, Any]:
    """DeepSpeed's JSON with its `pipeline` section (`stages`, `partition`) set (a copy);
    pretrain.pipeline.configure_pipeline checks the layout first."""
    config = copy.deepcopy(ds_config)
    section = config.setdefault("pipeline", {})
    section["stages"] = stages
    section["partition"] = partition
    return config


# Switched off where ZeRO-1/2 partition over one rank: there is no communication to overlap, and
# the contiguous bucket costs a per-gradient copy and hooks (bench/host_overhead.py: docs/performance.md).
ONE_RANK_ZERO_SETTINGS = {"overlap_comm": False, "contiguous_gradients": False}
_DEEPSPEED_DEFAULTS_AT_ZERO_1_2 = {"overlap_comm": False, "contiguous_gradients": True}


def for_one_zero_rank(ds_config: dict[str, Any], zero_ranks: int) -> tuple[dict[str, Any], str | None]:
    """(DeepSpeed's JSON, a one-line notice): where ZeRO-1/2 without offload partition over
    `zero_ranks` = 1 rank, a copy with ONE_RANK_ZERO_SETTINGS, and ZeRO-2 built as ZeRO-1 (one rank
    has no gradients to partition; ZeRO-2's per-parameter gradient hooks only cost host time); else
    the JSON itself and None. The arithmetic is the same; a checkpoint is ZeRO-1's, which a ZeRO-2
    run on other ranks loads through the universal checkpoint (pretrain.universal_checkpoint)."""
    zero = ds_config.get("zero_optimization") or {}
    offloaded = offloads_to_host(ds_config)
    stage = zero_stage_of(ds_config)
    changed = {key: value for key, value in ONE_RANK_ZERO_SETTINGS.items() if zero.get(key, _DEEPSPEED_DEFAULTS_AT_ZERO_1_2[key]) != value}
    if zero_ranks != 1 or stage not in (1, 2) or offloaded or not (changed or stage == 2):
        return ds_config, None
    config = copy.deepcopy(ds_config)
    config["zero_optimization"].update(changed, stage=1)
    how = ["built as ZeRO-1 (no gradients to partition at one rank)"] if stage == 2 else []
    how += [f"zero_optimization.{key} {str(value).lower()}" for key, value in changed.items()]
    return config, (f"ZeRO-{stage} on one data-parallel rank: {', '.join(how)}: less host time per step, "
                    "the same losses (docs/performance.md)")


def as_zero0_on_one_rank(ds_config: dict[str, Any], world_size: int, saved_stage: int | None) -> tuple[dict[str, Any], str | None]:
    """(DeepSpeed's JSON, a one-line notice): a ZeRO-1/2/3 JSON without offload, in torch_autocast or fp32,
    on a world of one rank, built as ZeRO-0 (a copy); else the JSON itself and None.

    One rank holds every partition, so ZeRO-1/2/3 keep the whole model and optimizer state there as ZeRO-0
    does, and do ZeRO-0's arithmetic (tests/pretrain/test_one_rank_zero.py: the same losses and gradient
    norms); but DeepSpeed's ZeRO optimizers keep their own flat fp32 copy of the weights and copy every
    gradient into it and the weights back out each step, and ZeRO-3 also gathers and releases every weight
    around its use (on one H200, gpt2-124m: ZeRO-1 0.927x a plain PyTorch loop against ZeRO-0's 0.993x,
    DeepCompile's ZeRO-3 0.40-0.45x; docs/performance.md). A ZeRO-3 JSON's DeepCompile section goes with its
    stage (train.compile compiles the model as at ZeRO-0). Its checkpoints are ZeRO-0's: ZeRO-0 loads them on
    any number of ranks, ZeRO-1/2 on more ranks load them too (pretrain.checkpoint.load, `from_zero0`), and
    ZeRO-3 through a universal copy (pretrain.universal_checkpoint.zero0_universal_copy). A resume of a
    checkpoint that ZeRO-1/2/3 wrote (`saved_stage` >= 1) keeps the JSON's stage; so does the bf16/fp16 mode,
    whose optimizer is another (deepspeed.one_rank_zero0 = false keeps it always)."""
    stage = zero_stage_of(ds_config)
    half_mode = any((ds_config.get(key) or {}).get("enabled") for key in ("bf16", "fp16"))
    if world_size != 1 or stage not in (1, 2, 3) or offloads_to_host(ds_config) or half_mode or saved_stage not in (None, 0):
        return ds_config, None
    config = copy.deepcopy(ds_config)
    config["zero_optimization"] = {"stage": 0}
    if stage == 3 and (config.get("compile") or {}).get("deepcompile"):
        del config["compile"]  # DeepCompile's passes are ZeRO-3's (and ZeRO-1/2's on more ranks)
    return config, (f"ZeRO-{stage} on one rank: built as ZeRO-0 (one rank holds every partition: the same arithmetic "
                    "without ZeRO's flat copy of the weights); its checkpoints are ZeRO-0's, which ZeRO-1/2/3 on more ranks "
                    "resume (deepspeed.one_rank_zero0: false keeps the JSON's stage; docs/performance.md)")


def with_universal_loading(ds_config: dict[str, Any]) -> dict[str, Any]:
    """DeepSpeed's JSON with `checkpoint.load_universal` on (a copy): a resume on another number of
    data-parallel ranks (pretrain.universal_checkpoint)."""
    config = copy.deepcopy(ds_config)
    config.setdefault("checkpoint", {})["load_universal"] = True
    return config
