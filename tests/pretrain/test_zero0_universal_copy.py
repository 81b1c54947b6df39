"""pretrain.universal_checkpoint: zero0_universal_copy writes ZeRO-0's one checkpoint file in the universal layout
DeepSpeed's ZeRO-3 loader reads (the 2-rank resume itself: tests/pretrain/test_one_rank_zero.py); both conversions write universal/ alike."""
import pytest
import torch

from lmforge.errors import LmforgeError
from pretrain.universal_checkpoint import zero0_universal_copy

NAMES = [["w", "v"], ["b"]]


def zero0_checkpoint(folder, step=7.0):
    """A ZeRO-0 model-states file as DeepSpeed writes it: the module, torch AdamW's state and the engine's own state."""
    gen = torch.Generator().manual_seed(0)
    module = {"w": torch.randn(4, 3, generator=gen), "v": torch.randn(3, 3, generator=gen), "b": torch.randn(3, generator=gen)}
    state = {i: {"step": torch.tensor(step), "exp_avg": torch.randn(module[n].shape, generator=gen),
                 "exp_avg_sq": torch.rand(module[n].shape, generator=gen)} for i, n in enumerate(["w", "v", "b"])}
    groups = [{"weight_decay": 0.1, "name": "decay", "lr": 2e-4, "betas": (0.9, 0.95), "params": [0, 1]},
              {"weight_decay": 0.0, "name": "no_decay", "lr": 2e-4, "betas": (0.9, 0.95), "params": [2]}]
    folder.mkdir(parents=True)
    saved = {"module": module, "optimizer": {"state": state, "param_groups": groups}, "lr_scheduler": {"last_batch_iteration": 6},
             "global_steps": 7, "dp_world_size": 1, "mp_world_size": 1, "step": 7, "seed": 1234}
    torch.save(saved, folder / "mp_rank_00_model_states.pt")
    return saved


def test_each_parameter_is_written_whole_with_its_moments_and_the_engine_state_without_the_weights(tmp_path):
    folder = tmp_path / "step_00000007"
    saved = zero0_checkpoint(folder)
    target = zero0_universal_copy(folder, NAMES)
    assert target == folder / "universal" and not (folder / "universal.partial").exists()
    out = target / "step_00000007"
    for index, name in enumerate(["w", "v", "b"]):
        assert torch.equal(torch.load(out / "zero" / name / "fp32.pt")["param"], saved["module"][name])
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(torch.load(out / "zero" / name / f"{key}.pt")["param"], saved["optimizer"]["state"][index][key])
    optimizer_state = torch.load(out / "zero" / "optimizer_state.pt")
    assert optimizer_state["zero_stage"] == 3
    assert [g["weight_decay"] for g in optimizer_state["optimizer_state_dict"]["param_groups"]] == [0.1, 0.0]  # each group its own
    assert float(optimizer_state["optimizer_state_dict"]["state"][0]["step"]) == 7.0
    engine = torch.load(out / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    assert engine["module"] == {} and "optimizer" not in engine
    assert (engine["lr_scheduler"], engine["global_steps"], engine["step"], engine["seed"]) == ({"last_batch_iteration": 6}, 7, 7, 1234)
    assert zero0_universal_copy(folder, NAMES) == target  # written once: a second resume reads it as it is


@pytest.mark.parametrize("damage, expected", [
    ("truncated", "could not be read into a universal copy for ZeRO-3 ("),
    ("missing", "no mp_rank_00_model_states.pt"),
    ("other groups", "2 optimizer groups saved, 1 here"),
    ("other model", "no weight or torch AdamW state saved for u"),
])
def test_a_checkpoint_that_does_not_fit_is_one_line_naming_it_and_leaves_no_copy(tmp_path, damage, expected):
    folder = tmp_path / "step_00000007"
    zero0_checkpoint(folder)
    names = NAMES
    file = folder / "mp_rank_00_model_states.pt"
    if damage == "truncated":
        file.write_bytes(file.read_bytes()[:200])
    elif damage == "missing":
        file.unlink()
    elif damage == "other groups":
        names = [["w", "v", "b"]]
    else:
        names = [["w", "u"], ["b"]]
    with pytest.raises(LmforgeError) as err:
        zero0_universal_copy(folder, names)
    message = str(err.value)
    assert message.startswith(str(folder)) and expected in message and "\n" not in message
    assert sorted(p.name for p in folder.iterdir()) == ([] if damage == "missing" else ["mp_rank_00_model_states.pt"])


def test_the_copy_goes_beside_the_checkpoints_files_and_never_over_what_is_already_there(tmp_path):
    """It reads ZeRO-0's file and writes only universal/ (through universal.partial): the checkpoint's own files
    keep their bytes; a universal/ folder already there is used as it is, a file of that name is refused."""
    folder = tmp_path / "step_00000007"
    zero0_checkpoint(folder)
    (folder / "COMPLETE").write_text("{}")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    zero0_universal_copy(folder, NAMES)
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in folder.iterdir()) == sorted([*before, "universal"])

    other = tmp_path / "step_00000008"
    zero0_checkpoint(other)
    (other / "universal").mkdir()
    (other / "universal" / "notes.txt").write_text("someone's")
    assert zero0_universal_copy(other, NAMES) == other / "universal"
    assert [p.name for p in (other / "universal").iterdir()] == ["notes.txt"]
    assert (other / "universal" / "notes.txt").read_text() == "someone's"

    third = tmp_path / "step_00000009"
    zero0_checkpoint(third)
    (third / "universal").write_text("someone's")
    with pytest.raises(LmforgeError, match="universal: exists and is not a universal checkpoint folder") as err:
        zero0_universal_copy(third, NAMES)
    assert "\n" not in str(err.value)
    assert (third / "universal").read_text() == "someone's"
    assert sorted(p.name for p in third.iterdir()) == ["mp_rank_00_model_states.pt", "universal"]


def test_ds_to_universal_copy_refuses_a_file_named_universal_before_it_converts(tmp_path, capsys):
    """The ZeRO-1/2/3 conversion (universal_copy, DeepSpeed's ds_to_universal) shares the copy's writing: a file of
    that name is someone's, refused in one line before the converter runs."""
    from pretrain.universal_checkpoint import universal_copy

    folder = tmp_path / "step_00000005"
    folder.mkdir()
    (folder / "universal").write_text("someone's")
    with pytest.raises(LmforgeError, match="universal: exists and is not a universal checkpoint folder") as err:
        universal_copy(folder)
    assert "\n" not in str(err.value) and "converting" not in capsys.readouterr().out
    assert (folder / "universal").read_text() == "someone's" and [p.name for p in folder.iterdir()] == ["universal"]
