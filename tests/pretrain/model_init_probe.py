"""Run under torchrun: builds the tiny model under ZeRO-3 (zero.Init) on every rank and writes the
gathered weights, with the parameter count, next to those of the plain build (same seed)."""
import sys

import torch

from lmforge.distributed import init_distributed, shutdown
from pretrain.engine import build_model, model_parameters
from pretrain.model import ModelConfig, Transformer


def main(out: str, arch: str) -> None:
    import deepspeed

    info = init_distributed()
    config = ModelConfig(arch=arch, vocab_size=100, n_layers=2, d_model=32, n_heads=4, max_seq_len=16)
    ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    torch.manual_seed(7)
    model = build_model(config, ds)
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        built = {k: v.detach().clone() for k, v in model.state_dict().items()}
    partitioned = sum(p.numel() for p in model.parameters())
    torch.manual_seed(7)
    plain = Transformer(config)
    if info.rank == 0:
        torch.save({"built": built, "plain": plain.state_dict(), "count": model_parameters(model),
                    "plain_count": plain.num_params(), "local_numel": partitioned}, out)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
