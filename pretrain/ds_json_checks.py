"""Is a DeepSpeed JSON one DeepSpeed accepts, and means what it says? Judged before any process starts.

DeepSpeed ignores a top-level key it does not know (a misspelt `zero_optimisation` trains at
ZeRO-0), and it learns that a section has the wrong type (`"bf16": true`), a stage is `"three"`
or NVMe offload has no path only once the ranks run, after minutes of op builds. Here:

- top-level keys: against `TOP_LEVEL_KEYS`, the keys DeepSpeed 0.19's `DeepSpeedConfig` reads
  (it has no model for the top level); an unknown one suggests the closest known key;
- sections DeepSpeed has a pydantic model for (`SECTION_MODELS`: zero_optimization with its
  offload sections, bf16, fp16, the monitors, comms_logger, compile, hybrid_engine,
  tensor_parallel) are validated by that model itself: types, ranges and unknown keys
  (`extra="forbid"`), each pydantic error one line naming the full key;
- the sections without a model that lmforge relies on (optimizer, scheduler, torch_autocast,
  activation_checkpointing): their shape and keys;
- what DeepSpeed accepts but cannot run: ZeRO offload with a too-low stage, NVMe without a path,
  bf16 asked for on a GPU without it.

Each problem is one string `FILE: KEY = VALUE: what was expected`.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import logging
from pathlib import Path
from typing import Any

# What DeepSpeedConfig._initialize_params and the configs it builds read at the top level (0.19).
TOP_LEVEL_KEYS = (
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "managed_gradient_accumulation",
    "steps_per_print", "dump_state", "disable_python_gc", "disable_allgather", "communication_data_type",
    "seq_parallel_communication_data_type", "prescale_gradients", "gradient_predivide_factor", "gradient_allreduce_op",
    "sparse_gradients", "zero_optimization", "activation_checkpointing", "comms_logger", "tensorboard", "wandb",
    "csv_monitor", "comet", "gradient_clipping", "fp16", "bf16", "bfloat16", "torch_autocast", "optimizer", "scheduler",
    "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "flops_profiler", "wall_clock_breakdown",
    "memory_breakdown", "autotuning", "use_data_before_expert_parallelism", "hybrid_engine", "pipeline",
    "data_efficiency", "curriculum_learning", "checkpoint", "data_types", "aio", "dataloader_drop_last", "log_level",
    "datastates_ckpt", "weight_quantization", "compile", "timers", "tensor_parallel", "expert_parallel",
    "vocabulary_size", "elasticity", "amp", "sparse_attention", "compression_training", "eigenvalue",
    "progressive_layer_drop", "quantize_training", "nebula", "sequence_parallel_size", "zenflow",
)

# section -> "module:Model", DeepSpeed's own pydantic models (imported only when the section is present).
SECTION_MODELS = {
    "zero_optimization": "deepspeed.runtime.zero.config:DeepSpeedZeroConfig",
    "bf16": "deepspeed.runtime.precision_config:DeepSpeedBF16Config",
    "bfloat16": "deepspeed.runtime.precision_config:DeepSpeedBF16Config",
    "fp16": "deepspeed.runtime.precision_config:DeepSpeedFP16Config",
    "tensorboard": "deepspeed.monitor.config:TensorBoardConfig",
    "wandb": "deepspeed.monitor.config:WandbConfig",
    "csv_monitor": "deepspeed.monitor.config:CSVConfig",
    "comet": "deepspeed.monitor.config:CometConfig",
    "comms_logger": "deepspeed.comm.config:CommsLoggerConfig",
    "compile": "deepspeed.compile.config:CompileConfig",
    "hybrid_engine": "deepspeed.runtime.config:HybridEngineConfig",
    "tensor_parallel": "deepspeed.runtime.tensor_parallel.config:TPTrainingConfig",
}

# Sections without a DeepSpeed model: the keys DeepSpeed reads in them.
SECTION_KEYS = {
    "optimizer": ("type", "params", "legacy_fusion"),
    "scheduler": ("type", "params"),
    "torch_autocast": ("enabled", "dtype", "lower_precision_safe_modules"),
    "activation_checkpointing": ("partition_activations", "number_checkpoints", "contiguous_memory_optimization",
                                 "synchronize_checkpoint_boundary", "profile", "cpu_checkpointing"),
}
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
AUTO = "auto"


def closest(name: str, options: Any) -> str:
    match = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f"; did you mean '{match[0]}'?" if match else ""


@contextlib.contextmanager
def _deepspeed_import_quiet():
    """Importing DeepSpeed logs "Setting accelerator to CPU..." to stdout, which `preflight --print-exports`
    keeps for `export` lines only: records of DeepSpeed's logger are dropped while the models are imported."""
    logger = logging.getLogger("DeepSpeed")
    drop = logging.Filter("-")  # matches no logger name: every record is dropped
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _model(section: str):
    module, name = SECTION_MODELS[section].split(":")
    with _deepspeed_import_quiet():
        return getattr(importlib.import_module(module), name)


def _model_keys(model) -> list[str]:
    keys = []
    for name, info in model.model_fields.items():
        keys.append(name)
        if info.alias:
            keys.append(info.alias)
    return keys


def _model_problems(section: str, values: dict[str, Any], source: Path) -> list[str]:
    """DeepSpeed's own model of `section` judges `values`; each pydantic error becomes one line."""
    import pydantic

    model = _model(section)
    try:
        model(**values)  # DeepSpeedConfigModel drops "auto" values itself, as DeepSpeed does
        return []
    except pydantic.ValidationError as err:
        found = []
        for error in err.errors():
            loc = [str(part) for part in error["loc"]]
            key = ".".join([section, *loc])
            if error["type"] == "extra_forbidden":
                sub = model
                for part in loc[:-1]:  # a nested model (offload_param, ...): suggest from its own fields
                    annotation = sub.model_fields.get(part).annotation if part in sub.model_fields else None
                    sub = next((a for a in getattr(annotation, "__args__", (annotation,)) if hasattr(a, "model_fields")), None)
                    if sub is None:
                        break
                hint = closest(loc[-1], _model_keys(sub)) if sub is not None else ""
                found.append(f"{source}: unknown key '{key}' (DeepSpeed does not read it){hint}")
            elif key == "zero_optimization.stage":  # pydantic lists the enum's max_stage alias as a fifth value
                found.append(f"{source}: {key} = {error.get('input')!r}: expected 0, 1, 2 or 3 (the ZeRO stage)")
            else:
                found.append(f"{source}: {key} = {error.get('input')!r}: {error['msg'][0].lower()}{error['msg'][1:]}")
        return found
    except (TypeError, ValueError, AssertionError) as err:  # DeepSpeed's own validators raise these too
        return [f"{source}: {section}: {err}"]


def _keyed_section_problems(section: str, values: dict[str, Any], source: Path) -> list[str]:
    known = SECTION_KEYS[section]
    found = [f"{source}: unknown key '{section}.{key}' (DeepSpeed does not read it){closest(key, known)}"
             for key in values if key not in known]
    if section in ("optimizer", "scheduler"):
        if "type" in values and not isinstance(values["type"], str):
            found.append(f"{source}: {section}.type = {values['type']!r}: expected a name like \"AdamW\"")
        if "params" in values and not isinstance(values["params"], dict):
            found.append(f"{source}: {section}.params = {values['params']!r}: expected an object of settings")
    if section == "torch_autocast" and values.get("enabled", False) not in (True, False, AUTO):
        found.append(f"{source}: torch_autocast.enabled = {values['enabled']!r}: expected true, false or \"auto\"")
    if section == "activation_checkpointing":
        count = values.get("number_checkpoints")
        if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 1):
            found.append(f"{source}: activation_checkpointing.number_checkpoints = {count!r}: expected a positive integer or null")
    return found


def _offload_problems(zero: dict[str, Any], source: Path) -> list[str]:
    found = []
    stage = zero.get("stage", 0)
    for key, min_stage, what in (("offload_optimizer", 1, "optimizer states"), ("offload_param", 3, "parameters")):
        section = zero.get(key)
        if not isinstance(section, dict):
            continue  # the model reported a wrong type
        device = section.get("device", "none")
        if device not in OFFLOAD_DEVICES or device == "none":
            continue
        if isinstance(stage, int) and stage < min_stage:
            found.append(
                f"{source}: zero_optimization.{key}.device = {device!r} with zero_optimization.stage = {stage}: "
                f"offloading {what} needs stage {min_stage}{' or higher' if min_stage < 3 else ''}"
            )
        if device == "nvme" and not section.get("nvme_path"):
            found.append(f"{source}: zero_optimization.{key}.device = 'nvme' needs zero_optimization.{key}.nvme_path "
                         "(a folder on a local NVMe disk)")
    return found


def deepspeed_json_problems(raw: dict[str, Any], source: Path) -> list[str]:
    """Every problem of DeepSpeed's JSON `raw` (read from `source`) that DeepSpeed would hit later or never."""
    found: list[str] = []
    for key, values in raw.items():
        if key not in TOP_LEVEL_KEYS:
            found.append(f"{source}: unknown key '{key}' (DeepSpeed would ignore it){closest(key, TOP_LEVEL_KEYS)}")
            continue
        if key not in SECTION_MODELS and key not in SECTION_KEYS:
            continue
        if not isinstance(values, dict):
            example = '{"stage": 1}' if key == "zero_optimization" else ('{"type": "AdamW"}' if key == "optimizer" else '{"enabled": true}')
            found.append(f"{source}: {key} = {values!r}: expected an object like {example}")
            continue
        found += _model_problems(key, values, source) if key in SECTION_MODELS else _keyed_section_problems(key, values, source)
    zero = raw.get("zero_optimization")
    if isinstance(zero, dict) and not any(p.startswith(f"{source}: zero_optimization.stage") for p in found):
        found += _offload_problems(zero, source)
    return found


def precision_problems(raw: dict[str, Any], source: Path, gpu_name: str | None, gpu_bf16: bool) -> list[str]:
    """bf16 asked for explicitly (not "auto") that this machine's GPU cannot do; no GPU: no check.

    A launch node without GPUs cannot judge the compute nodes, so only a GPU that is here is checked.
    """
    bf16 = raw.get("bf16")
    if gpu_name is None or not isinstance(bf16, dict):
        return []
    if bf16.get("enabled") is True and not gpu_bf16:
        return [f"{source}: bf16.enabled = true but {gpu_name} has no bf16 support; "
                "set it to \"auto\" (fp32 there) or use ds_configs/zero2_fp16.json"]
    return []
