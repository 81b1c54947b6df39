"""Resuming a ZeRO checkpoint on a different number of data-parallel ranks.

ZeRO 1-3 partition the optimizer state (and, for stage 3, the weights) by data-parallel rank, and
DeepSpeed refuses to load such a checkpoint on another number of ranks. Its universal checkpoint
format stores every parameter whole (`zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt`) and can be
loaded on any number of ranks with `"checkpoint": {"load_universal": true}` in the JSON. We run
DeepSpeed's own converter (`deepspeed.checkpoint.ds_to_universal`) once per checkpoint, on the
main rank, into RUN_DIR/checkpoints/<tag>/universal/<tag>/ (so pruning the tag removes it too).
ZeRO-0 checkpoints hold the whole optimizer state and load on any number of ranks as they are; ZeRO-1/2
load them too (`load_zero0_optimizer_state`: each rank takes its slice of every state), and ZeRO-3 from a
universal copy written from ZeRO-0's file (`zero0_universal_copy`): a one-rank run of a ZeRO-1/2/3 JSON runs
as ZeRO-0 (pretrain.ds_config.as_zero0_on_one_rank) and continues on more ranks.
"""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from lmforge import distributed
from lmforge.errors import LmforgeError
from lmforge.run_layout import UNIVERSAL_DIR



def loads_zero0_into_zero(record: dict[str, Any], zero_stage: int) -> bool:
    """True when `record`'s checkpoint is ZeRO-0's and the run here is ZeRO-1/2 (`load_zero0_optimizer_state`)."""
    return record.get("zero_stage") == 0 and zero_stage in (1, 2)


def saved_adam_entries(saved: Any, shapes: list[list[torch.Size]], folder: Path) -> list[list[dict[str, Any] | None]]:
    """The torch AdamW state dict `saved` of ZeRO-0's checkpoint `folder`, checked against the shapes of each
    optimizer group's parameters here: each parameter's entry (step, exp_avg, exp_avg_sq; None for one that
    never stepped), group by group in the saved order."""
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) or not isinstance(saved.get("param_groups"), list):
        raise LmforgeError(f"{folder}: a ZeRO-0 checkpoint without a torch optimizer state; resume it with ds_configs/zero0.json")
    if len(saved["param_groups"]) != len(shapes):
        raise LmforgeError(f"{folder}: {len(saved['param_groups'])} optimizer groups saved, {len(shapes)} here; "
                           "resume it with ds_configs/zero0.json")
    found = []
    for group_shapes, saved_group in zip(shapes, saved["param_groups"]):
        indices = saved_group.get("params", [])
        if len(indices) != len(group_shapes):
            raise LmforgeError(f"{folder}: an optimizer group of {len(indices)} parameters saved, {len(group_shapes)} here; "
                               "resume it with ds_configs/zero0.json")
        entries = [saved["state"].get(index) for index in indices]
        if any(entry is not None and (not isinstance(entry, dict) or any(
                not torch.is_tensor(entry.get(key)) or tuple(entry[key].shape) != tuple(shape) for key in ("exp_avg", "exp_avg_sq")))
               for entry, shape in zip(entries, group_shapes)):
            raise LmforgeError(f"{folder}: its optimizer state is not torch AdamW's for these parameters; "
                               "resume it with ds_configs/zero0.json")
        found.append(entries)
    return found


def load_zero0_optimizer_state(zero, saved: Any, groups: list[list[torch.nn.Parameter]], folder: Path) -> None:
    """Gives DeepSpeed's ZeRO-1/2 optimizer `zero` the torch AdamW state `saved` of a ZeRO-0 checkpoint.

    `groups` are the model's parameters in the order of the optimizer's groups at the save (pretrain.engine.
    parameter_groups); the checkpoint's module weights are already loaded and copied into ZeRO's fp32
    partitions. ZeRO flattens each group's parameters in that order (padded at the end) and gives rank r
    elements [r * size, (r + 1) * size): each moment is flattened and sliced the same way. The groups'
    values (the lr the scheduler set for the next step, betas, weight decay) are the saved ones, as
    DeepSpeed's universal loader does."""
    saved_entries = saved_adam_entries(saved, [[p.shape for p in params] for params in groups], folder)
    if len(zero.round_robin_bit16_groups) != len(groups):
        raise LmforgeError(f"{folder}: {len(saved['param_groups'])} optimizer groups saved, {len(groups)} here; "
                           "resume it with ds_configs/zero0.json")
    entry_of = {id(param): entry for params, entries in zip(groups, saved_entries) for param, entry in zip(params, entries)}
    for i, params in enumerate(zero.round_robin_bit16_groups):
        ranks, rank = zero.partition_count[i], torch.distributed.get_rank(group=zero.real_dp_process_group[i])
        entries = [entry_of.get(id(p)) for p in params]
        if any(entry is None for entry in entries):
            if any(entry is not None for entry in entries):
                raise LmforgeError(f"{folder}: some parameters of an optimizer group have no saved state")
            continue  # this group never stepped: its state starts empty, as it would have
        master = zero.single_partition_of_fp32_groups[i]
        size, fused = master.numel(), zero.optimizer.param_groups[i].get("fused") or zero.optimizer.param_groups[i].get("capturable")
        state: dict[str, Any] = {}
        for key in ("exp_avg", "exp_avg_sq"):
            flat = torch.cat([entry[key].reshape(-1).to(torch.float32) for entry in entries])
            flat = torch.nn.functional.pad(flat, (0, size * ranks - flat.numel()))
            state[key] = flat[rank * size:(rank + 1) * size].to(master.device).clone()
        step = float(entries[0]["step"])
        state["step"] = torch.tensor(step, dtype=torch.float32, device=master.device if fused else "cpu")
        zero.optimizer.state[master] = state
    for group, saved_group in zip(zero.optimizer.param_groups, saved["param_groups"]):  # the lr of the saved step, betas, decay
        group.update({key: value for key, value in saved_group.items() if key != "params"})


def needs_universal(record: dict[str, Any], data_parallel_size: int, zero_stage: int, folder: Path) -> bool:
    """True when `record`'s checkpoint must go through the universal format to load here."""
    saved_dp, saved_stage = record.get("data_parallel_size"), record.get("zero_stage")
    if saved_dp is None or saved_stage is None:
        return False  # written before records had these: DeepSpeed loads it or says why not
    # ZeRO-1 and ZeRO-2 share the universal form (a ZeRO-2 JSON runs as ZeRO-1 on one rank: pretrain.ds_config.for_one_zero_rank)
    if saved_stage != zero_stage and not ({saved_stage, zero_stage} == {1, 2} and saved_dp != data_parallel_size):
        raise LmforgeError(
            f"{folder}: written with ZeRO-{saved_stage} but deepspeed.config is ZeRO-{zero_stage}; "
            f"resume with a ZeRO-{saved_stage} JSON (e.g. ds_configs/zero{saved_stage}.json)"
        )
    return saved_stage > 0 and saved_dp != data_parallel_size


def _workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def _ds_to_universal(folder: Path, out: Path) -> None:
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(folder),
           "--output_folder", str(out), "--num_extract_workers", str(_workers()),
           "--num_merge_workers", str(_workers()), "--inject_missing_state"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr.strip() or result.stdout.strip() or "no output").splitlines()[-1]
        raise RuntimeError(f"{folder}: DeepSpeed's ds_to_universal failed ({tail})")


def _written_once(folder: Path, notice: str, write: Callable[[Path], None], failed: Callable[[Exception], str]) -> Path:
    """`folder`/universal/, written by the main rank on first use: `write(out)` fills `out`
    (universal.partial/<tag>/), renamed into place once whole and removed if not. A universal/ folder
    already there is used as it is; anything else of that name is refused. `failed` words a write's
    error; every rank raises the main rank's failure as one LmforgeError."""
    target = folder / UNIVERSAL_DIR
    partial = folder / f"{UNIVERSAL_DIR}.partial"
    failure = None
    if distributed.is_main() and (target.exists() or target.is_symlink()) and not target.is_dir():
        failure = f"{target}: exists and is not a universal checkpoint folder; move it out of the checkpoint to resume"
    elif distributed.is_main() and not target.is_dir():
        print(notice, flush=True)
        shutil.rmtree(partial, ignore_errors=True)
        try:
            write(partial / folder.name)
            os.replace(partial, target)
        except LmforgeError as err:
            failure = str(err)
        except (OSError, RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as err:
            failure = failed(err)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    failure = distributed.broadcast_object(failure)
    if failure:
        raise LmforgeError(failure)
    return target


def universal_copy(folder: Path) -> Path:
    """The directory DeepSpeed loads `folder`'s tag from in universal format (converted on first use)."""
    return _written_once(folder, f"converting {folder} to DeepSpeed's universal checkpoint format (a different number of ranks)",
                         lambda out: _ds_to_universal(folder, out), str)


def loads_zero0_into_zero3(record: dict[str, Any], zero_stage: int) -> bool:
    """True when `record`'s checkpoint is ZeRO-0's and the run here is ZeRO-3 (`zero0_universal_copy`)."""
    return record.get("zero_stage") == 0 and zero_stage == 3


def zero0_universal_copy(folder: Path, parameter_names: list[list[str]]) -> Path:
    """The directory DeepSpeed's ZeRO-3 loads ZeRO-0's checkpoint `folder` from, in universal format (written
    on first use, by the main rank): a ZeRO-3 JSON runs as ZeRO-0 on one rank (pretrain.ds_config.
    as_zero0_on_one_rank) and continues at ZeRO-3 on more ranks.

    `parameter_names` are the model's parameter names in the order of the optimizer's groups at the save
    (pretrain.engine.parameter_groups). ZeRO-0's one file holds the whole model and torch AdamW's state;
    the universal layout DeepSpeed's ZeRO-3 loader reads (stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3)
    holds each parameter whole, `zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt`, the groups and step in
    `zero/optimizer_state.pt`, and the engine's own state (scheduler, step counts, client state) in ZeRO-3's
    model-states file; every rank then takes its slice of each."""
    def failed(err: Exception) -> str:
        return (f"{folder}: could not be read into a universal copy for ZeRO-3 ({type(err).__name__}: "
                f"{(str(err).strip().splitlines() or [''])[0][:300]})")

    return _written_once(folder, f"converting {folder} (ZeRO-0's) to DeepSpeed's universal checkpoint format for ZeRO-3",
                         lambda out: _write_zero0_universal(folder, out, parameter_names), failed)


def _write_zero0_universal(folder: Path, out: Path, parameter_names: list[list[str]]) -> None:
    source = folder / "mp_rank_00_model_states.pt"
    if not source.is_file():
        raise LmforgeError(f"{folder}: no mp_rank_00_model_states.pt (ZeRO-0's checkpoint file); resume it with ds_configs/zero0.json")
    saved = torch.load(source, map_location="cpu", weights_only=True, mmap=True)
    module, optimizer = saved.get("module"), saved.get("optimizer")
    if not isinstance(module, dict):
        raise LmforgeError(f"{folder}: a ZeRO-0 checkpoint without its module state; resume it with ds_configs/zero0.json")
    missing = [name for names in parameter_names for name in names if not torch.is_tensor(module.get(name))]
    if missing:
        raise LmforgeError(f"{folder}: no weight or torch AdamW state saved for {missing[0]}; resume it with ds_configs/zero0.json")
    entries = saved_adam_entries(optimizer, [[module[name].shape for name in names] for names in parameter_names], folder)
    unstepped = [name for names, group in zip(parameter_names, entries) for name, entry in zip(names, group) if entry is None]
    if unstepped:
        raise LmforgeError(f"{folder}: no weight or torch AdamW state saved for {unstepped[0]}; resume it with ds_configs/zero0.json")
    for names, group in zip(parameter_names, entries):
        for name, entry in zip(names, group):
            (out / "zero" / name).mkdir(parents=True)
            for key, tensor in (("fp32", module[name]), ("exp_avg", entry["exp_avg"]), ("exp_avg_sq", entry["exp_avg_sq"])):
                torch.save({"param": tensor.to(torch.float32).clone()}, out / "zero" / name / f"{key}.pt")
    step = torch.as_tensor(next(entry for group in entries for entry in group)["step"], dtype=torch.float32).clone()
    groups = [dict(group) for group in optimizer["param_groups"]]
    torch.save({"zero_stage": 3, "param_groups": groups, "optimizer_state_dict": {"state": {0: {"step": step}}, "param_groups": groups}},
               out / "zero" / "optimizer_state.pt")
    # The engine's state (scheduler, step counts, lmforge's client state) without what zero/ now holds.
    engine_state = {key: value for key, value in saved.items() if key not in ("module", "optimizer")}
    torch.save({**engine_state, "module": {}}, out / "zero_pp_rank_0_mp_rank_00_model_states.pt")
