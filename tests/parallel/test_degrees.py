"""parallel.degrees.degree_problems: one rule per test, each refusal one line naming the keys and values."""
from dataclasses import dataclass

from parallel.config import ParallelConfig
from parallel.degrees import data_degree, degree_problems


@dataclass(frozen=True)
class Shapes:
    n_heads: int = 8
    kv_heads: int = 4
    hidden_dim: int = 256
    n_experts: int = 0


def problems(world=8, shapes=Shapes(), seq_len=64, zero_stage=1, **degrees):
    return degree_problems(ParallelConfig(**degrees), world, shapes, seq_len, zero_stage)


def test_a_layout_that_fits_has_no_problems():
    assert problems(world=8, tensor=2) == []
    assert problems(world=8, data=4, tensor=2) == []
    assert problems(world=8, sequence=4) == []


def test_null_data_is_the_world_over_the_other_degrees():
    assert data_degree(ParallelConfig(tensor=2, pipeline_stages=2), 16) == 4
    assert data_degree(ParallelConfig(tensor=3), 8) is None


def test_explicit_degrees_whose_product_is_not_the_world_are_refused():
    assert problems(world=8, data=2, tensor=2) == [
        "parallel.data = 2 × parallel.pipeline_stages = 1 × parallel.tensor = 2 × parallel.sequence = 1 = 4, but 8 rank(s) "
        "were launched; make the product the world size, or set parallel.data to null to derive it"]


def test_derived_data_needs_the_other_degrees_to_divide_the_world():
    assert problems(world=6, tensor=4, shapes=Shapes(n_heads=8, kv_heads=8)) == [
        "parallel.pipeline_stages = 1 × parallel.tensor = 4 × parallel.sequence = 1 = 4 does not divide the 6 rank(s) "
        "launched; launch a multiple of 4 ranks"]


def test_tensor_must_divide_query_heads_kv_heads_and_the_mlp_width():
    found = problems(world=6, tensor=3, shapes=Shapes(n_heads=8, kv_heads=4, hidden_dim=256))
    assert [line.split(":")[0] for line in found] == [
        "parallel.tensor = 3 does not divide model.n_heads = 8",
        "parallel.tensor = 3 does not divide model.n_kv_heads = 4",
        "parallel.tensor = 3 does not divide model.d_ff (the MLP hidden width) = 256",
    ]


def test_sequence_must_divide_the_sequence_length_and_the_heads():
    found = problems(world=3, sequence=3, seq_len=64, shapes=Shapes(n_heads=8))
    assert [line.split(":")[0] for line in found] == [
        "parallel.sequence = 3 does not divide train.seq_len = 64",
        "parallel.sequence = 3 does not divide model.n_heads = 8",
        "parallel.sequence = 3 does not divide model.n_kv_heads = 4",
    ]


def test_sequence_must_divide_the_kv_heads_of_grouped_query_attention():
    found = problems(world=4, sequence=4, seq_len=64, shapes=Shapes(n_heads=8, kv_heads=2))
    assert [line.split(":")[0] for line in found] == ["parallel.sequence = 4 does not divide model.n_kv_heads = 2"]


def test_expert_must_divide_the_experts_and_the_data_group():
    found = problems(world=6, expert=4, shapes=Shapes(n_experts=6))
    assert [line.split(":")[0] for line in found] == [
        "parallel.expert = 4 does not divide model.n_experts = 6",
        "parallel.expert = 4 does not divide the 6 data-parallel rank(s)",
    ]


def test_expert_parallelism_without_experts_is_refused():
    assert problems(world=2, expert=2)[0].startswith("parallel.expert = 2 but model.n_experts = 0")


def test_tensor_with_zero3_or_pipeline_stages_is_refused():
    assert problems(world=2, tensor=2, zero_stage=3)[0].startswith("parallel.tensor = 2 with zero_optimization.stage = 3")
    found = problems(world=4, tensor=2, pipeline_stages=2)
    assert found == ["parallel.tensor = 2 with parallel.pipeline_stages = 2: DeepSpeed's pipeline engine does not take "
                     "AutoTP layers; choose one of the two"]


def test_degrees_below_one_are_reported_alone():
    assert problems(world=2, tensor=0) == ["parallel.tensor = 0: must be at least 1"]


def test_launch_checks_refuse_a_bad_layout_and_fill_autotp_for_a_good_one(tiny_corpus_shards, tmp_path):
    from pretrain import run_checks
    from pretrain.config import load_pretrain_config

    def config(*sets):
        return load_pretrain_config("tiny", [f"run.dir={tmp_path / 'run'}", f"data.path=[{tiny_corpus_shards.shard_dir}]",
                                             "model.n_heads=4", "model.n_kv_heads=2", *sets])

    bad = run_checks.check_launch(config("parallel.tensor=4"), 4, verify_checksums=False)
    assert bad.problems == ["parallel.tensor = 4 does not divide model.n_kv_heads = 2: each tensor-parallel rank holds "
                            "1/4 of them; choose a tensor degree that divides it"]
    assert not (tmp_path / "run").exists()
    good = run_checks.check_launch(config("parallel.tensor=2"), 4, verify_checksums=False)
    assert good.problems == []
    assert good.ds_config["tensor_parallel"]["autotp_size"] == 2
    assert good.ds_config["train_batch_size"] == 8 * 1 * 2  # micro × accumulation × 2 data-parallel ranks
