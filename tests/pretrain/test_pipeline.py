"""The pipeline's pieces on their own (no process group): layers, partition, checks, bubble, layer files."""
from __future__ import annotations

import pytest
import torch

from lmforge.errors import LmforgeError
from parallel.config import ParallelConfig
from pretrain.config import TrainConfig
from pretrain.ds_config import build_deepspeed_config
from pretrain.model import ModelConfig, Transformer
from pretrain.pipeline import (
    DEEPSPEED_PARTITION, BlockLayer, bubble_fraction, configure_pipeline, data_parallel_size, mean_token_loss,
    pipeline_layers, pipeline_metrics, pipeline_stages_of, release_other_stages, stage_bounds,
)
from pretrain.pipeline_checkpoint import pipeline_state_dict_to_model


def tiny(arch: str, **overrides) -> ModelConfig:
    base = dict(arch=arch, vocab_size=300, n_layers=4, n_heads=4, d_model=32, max_seq_len=64)
    if arch == "llama":
        base["n_kv_heads"] = 2
    return ModelConfig(**{**base, **overrides})


def run_layers(layers: list, tokens: torch.Tensor) -> torch.Tensor:
    """What the stages compute in sequence: a tied module is built once and shared, as on one stage."""
    from deepspeed.pipe import TiedLayerSpec

    tied, x = {}, tokens
    for layer in layers:
        if isinstance(layer, TiedLayerSpec):
            module = tied.setdefault(layer.key, layer.build())
            x = module(x) if layer.forward_fn is None else layer.forward_fn(module, x)
        else:
            x = layer(x)
    return x


def zero_json(tmp_path, stage: int) -> dict:
    path = tmp_path / f"zero{stage}.json"
    path.write_text(f'{{"zero_optimization": {{"stage": {stage}}}}}')
    return build_deepspeed_config(path, TrainConfig(), 1, False)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_pipeline_layers_compute_exactly_the_transformers_loss(arch):
    torch.manual_seed(0)
    model = Transformer(tiny(arch))
    tokens, targets = torch.randint(0, 300, (2, 24)), torch.randint(0, 300, (2, 24))
    logits = run_layers(pipeline_layers(model), tokens)
    assert logits.shape == (2, 24, 384)  # the padded vocab, as the training loss sees it
    assert torch.equal(mean_token_loss(logits, targets), model(tokens, targets))


def test_gpt2_embedding_and_head_are_one_tied_layer_and_llama_has_its_own_head():
    from deepspeed.pipe import TiedLayerSpec

    gpt2 = pipeline_layers(Transformer(tiny("gpt2")))
    assert isinstance(gpt2[0], TiedLayerSpec) and isinstance(gpt2[-1], TiedLayerSpec)
    assert gpt2[0].key == gpt2[-1].key and gpt2[-1].forward_fn is not None
    llama = pipeline_layers(Transformer(tiny("llama")))
    assert not isinstance(llama[0], TiedLayerSpec) and type(llama[-1]).__name__ == "LmHead"
    assert sum(isinstance(layer, BlockLayer) for layer in llama) == 4


def test_uniform_partition_splits_blocks_evenly_and_parameters_balances_weights():
    layers = pipeline_layers(Transformer(tiny("llama", n_layers=4)))  # 0 embed, 1 positions, 2-5 blocks, 6 norm, 7 head
    assert stage_bounds(layers, 2, DEEPSPEED_PARTITION["uniform"]) == [0, 4, 8]
    assert stage_bounds(layers, 4, DEEPSPEED_PARTITION["uniform"]) == [0, 3, 4, 5, 8]
    by_parameters = stage_bounds(layers, 2, DEEPSPEED_PARTITION["parameters"])
    assert by_parameters[0] == 0 and by_parameters[-1] == 8 and 2 < by_parameters[1] < 6


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_configure_pipeline_fills_deepspeed_pipeline_section_for_world_over_stages_replicas(arch, tmp_path):
    path = tmp_path / "zero1.json"
    path.write_text('{"zero_optimization": {"stage": 1}}')
    parallel = ParallelConfig(pipeline_stages=2, partition_method="uniform")
    train = TrainConfig(micro_batch_size=2, grad_accum_steps=3)
    assert data_parallel_size(parallel, 4) == 2
    built = build_deepspeed_config(path, train, data_parallel_size(parallel, 4), False)
    config = configure_pipeline(built, parallel, tiny(arch), world_size=4)
    assert config["pipeline"] == {"stages": 2, "partition": "type:BlockLayer"}
    assert config["train_batch_size"] == 2 * 3 * 2
    assert "pipeline" not in built  # a copy
    assert pipeline_stages_of(config) == 2 and pipeline_stages_of(built) == 1
    assert pipeline_metrics(config) == {"pipeline_stages": 2, "bubble_fraction": pytest.approx(1 / 4)}


def test_one_stage_leaves_the_deepspeed_config_as_it_was(tmp_path):
    built = zero_json(tmp_path, 3)
    assert configure_pipeline(built, ParallelConfig(), tiny("llama"), world_size=8) is built
    assert pipeline_metrics(built) == {}


@pytest.mark.parametrize("stages, world, zero, n_layers, expected", [
    (3, 4, 1, 4, "parallel.pipeline_stages = 3 does not divide the 4 rank(s) launched"),
    (2, 1, 1, 4, "parallel.pipeline_stages = 2 does not divide the 1 rank(s) launched"),
    (4, 4, 1, 2, "parallel.pipeline_stages = 4 exceeds model.n_layers = 2: every stage needs at least one transformer block"),
    (2, 2, 2, 4, "zero_optimization.stage = 2 with parallel.pipeline_stages = 2: DeepSpeed's pipeline engine supports ZeRO stage 0 or 1"),
    (2, 2, 3, 4, "zero_optimization.stage = 3 with parallel.pipeline_stages = 2"),
])
def test_impossible_layouts_are_one_line_errors(stages, world, zero, n_layers, expected, tmp_path):
    with pytest.raises(LmforgeError) as err:
        configure_pipeline(zero_json(tmp_path, zero), ParallelConfig(pipeline_stages=stages), tiny("gpt2", n_layers=n_layers), world)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_every_problem_of_a_layout_is_named_at_once(tmp_path):
    with pytest.raises(LmforgeError) as err:
        configure_pipeline(zero_json(tmp_path, 3), ParallelConfig(pipeline_stages=3), tiny("llama", n_layers=2), 4)
    message = str(err.value)
    assert "does not divide the 4 rank(s)" in message and "zero_optimization.stage = 3" in message
    assert "exceeds model.n_layers = 2" in message


def test_a_partition_that_leaves_a_stage_without_a_block_names_the_fix(tmp_path):
    # A large vocabulary: by parameter count the embedding and the tied head each fill a stage.
    model = tiny("gpt2", n_layers=3, vocab_size=3000)
    with pytest.raises(LmforgeError, match=r"partition_method = parameters gives stage 0 of 3 no transformer block "
                                           r"\(blocks per stage: \[0, 3, 0\]\).*uniform"):
        configure_pipeline(zero_json(tmp_path, 1), ParallelConfig(pipeline_stages=3), model, 3)
    uniform = ParallelConfig(pipeline_stages=3, partition_method="uniform")
    assert configure_pipeline(zero_json(tmp_path, 1), uniform, model, 3)["pipeline"]["stages"] == 3


def test_a_json_pipeline_section_that_contradicts_the_yaml_is_an_error(tmp_path):
    built = {**zero_json(tmp_path, 1), "pipeline": {"stages": 4}}
    with pytest.raises(LmforgeError, match=r"pipeline.stages = 4 contradicts parallel.pipeline_stages = 2"):
        configure_pipeline(built, ParallelConfig(pipeline_stages=2), tiny("llama"), 2)


def test_bubble_fraction_is_idle_share_of_one_f_one_b():
    assert bubble_fraction(1, 8) == 0.0
    assert bubble_fraction(2, 1) == pytest.approx(1 / 2)
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction(4, 1000) < 0.003


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_layer_files_map_back_to_the_transformers_state_dict(arch, tmp_path):
    torch.manual_seed(0)
    model = Transformer(tiny(arch))
    for index, layer in enumerate(pipeline_layers(model)):
        if getattr(layer, "forward_fn", None) is not None:
            continue  # DeepSpeed writes no file for the tied head
        module = layer.build() if hasattr(layer, "build") else layer
        torch.save(module.state_dict(), tmp_path / f"layer_{index:02d}-model_states.pt")
    state = pipeline_state_dict_to_model(tmp_path)
    expected = model.state_dict()
    assert sorted(state) == sorted(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_a_missing_layer_file_is_a_one_line_error(tmp_path):
    model = Transformer(tiny("llama"))
    layers = pipeline_layers(model)
    for index in (0, 1, 3):
        torch.save(layers[index].state_dict(), tmp_path / f"layer_{index:02d}-model_states.pt")
    with pytest.raises(LmforgeError, match=r"layer file\(s\) layer_02 missing"):
        pipeline_state_dict_to_model(tmp_path)


def test_other_stages_weights_are_released_but_counted(tmp_path):
    model = Transformer(tiny("gpt2"))
    total = model.num_params()
    layers = pipeline_layers(model)
    stage = torch.nn.ModuleList(layers[2:4])  # two blocks
    release_other_stages(model, stage)
    assert model.num_params() == total
    assert model.embed.weight.is_meta and model.lm_head.weight is model.embed.weight
    assert not model.blocks[0].attn.q_proj.weight.is_meta and model.blocks[2].attn.q_proj.weight.is_meta

