"""parallel.tensor without processes: the JSON section it writes, and how shards join back into the model."""
import torch

from parallel.tensor import merge_tensor_shards, shard_layout, tensor_parallel_json_problems, with_tensor_parallel
from pretrain.model import ModelConfig, Transformer


def test_with_tensor_parallel_fills_autotp_size_and_lmforges_layer_specs():
    config = with_tensor_parallel({"zero_optimization": {"stage": 1}}, 4)
    section = config["tensor_parallel"]
    assert section["autotp_size"] == 4
    kinds = {spec["partition_type"]: spec["patterns"][0] for spec in section["partition_config"]["layer_specs"]}
    assert kinds == {"row": r".*\.(o_proj|down_proj)\.weight$",
                     "column": r".*\.(q_proj|k_proj|v_proj|up_proj|gate_proj)\.weight$"}
    assert with_tensor_parallel({"a": 1}, 1) == {"a": 1}


def test_a_json_autotp_size_contradicting_parallel_tensor_is_one_line():
    assert tensor_parallel_json_problems({"tensor_parallel": {"autotp_size": 2}}, 4, "ds.json") == [
        "ds.json: tensor_parallel.autotp_size = 2 contradicts parallel.tensor = 4; remove it from the JSON or make them agree"]
    assert tensor_parallel_json_problems({"tensor_parallel": {"autotp_size": 4}}, 4) == []


def test_column_split_rows_and_row_split_columns_join_back_into_the_plain_model():
    model = Transformer(ModelConfig(arch="gpt2", vocab_size=64, n_layers=1, n_heads=4, d_model=32))
    full = model.state_dict()
    assert shard_layout("blocks.0.attn.q_proj.bias") == 0 and shard_layout("blocks.0.attn.o_proj.weight") == 1
    assert shard_layout("blocks.0.attn.o_proj.bias") is None and shard_layout("embed.weight") is None
    shards = [{name: (value.chunk(2, dim=shard_layout(name))[rank] if shard_layout(name) is not None else value)
               for name, value in full.items()} for rank in range(2)]
    assert shards[0]["blocks.0.mlp.up_proj.weight"].shape == (64, 32)
    merged = merge_tensor_shards(shards)
    assert merged.keys() == full.keys()
    assert all(torch.equal(merged[name], full[name]) for name in full)
