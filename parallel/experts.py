"""Expert parallelism: each plain MoE block becomes DeepSpeed's `deepspeed.moe.layer.MoE` holding
the same router and this rank's share of the experts.

DeepSpeed's gate is configured to route exactly as the plain block (pretrain/model.py MoEMLP,
Mixtral's routing): softmax in fp32, top-k, renormalised weights; `drop_tokens=False` (no capacity
limit: DeepSpeed sizes the buffers by the busiest expert over the expert-parallel group),
`top2_2nd_expert_sampling=False` (DeepSpeed's default samples the 2nd expert with Gumbel noise),
no noisy gate, `min_capacity=0`. Where DeepSpeed cannot match, the plain block is followed:
DeepSpeed's own `l_aux` counts only the top-1 choices (and k>2 divides by k), so the wrapper
recomputes Mixtral's load-balancing loss from the same router with the function the model passes.
The router runs in fp32 here (DeepSpeed casts it), in the model's dtype in the plain block: equal
in fp32, within rounding in bf16.

Works on the plain model by duck typing (parallel/ sits below pretrain/): a block is MoE if its
`mlp` has `router`, `experts` and `top_k`.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

LoadBalancingLoss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def is_moe_block(mlp: nn.Module) -> bool:
    return all(hasattr(mlp, name) for name in ("router", "experts", "top_k"))


class ExpertParallelMoE(nn.Module):
    """DeepSpeed's MoE layer in place of a plain block; after forward, `aux_loss` and `expert_load`
    (tokens of this rank per expert, all experts) as the plain block sets them."""

    def __init__(self, plain: nn.Module, expert_degree: int, load_balancing_loss: LoadBalancingLoss):
        super().__init__()
        from deepspeed.moe.layer import MoE
        from deepspeed.utils import groups

        n_experts, d_model = plain.router.weight.shape[0], plain.router.weight.shape[1]
        self.top_k, self._load_balancing_loss = plain.top_k, load_balancing_loss
        self.moe = MoE(hidden_size=d_model, expert=copy.deepcopy(plain.experts[0]), num_experts=n_experts,
                       ep_size=expert_degree, k=plain.top_k, min_capacity=0, noisy_gate_policy=None,
                       drop_tokens=False, use_rts=False, top2_2nd_expert_sampling=False)
        # The groups deepspeed.initialize would create (it then attaches them to the gate), made now so
        # this rank knows which experts it holds.
        name = self.moe.expert_group_name
        if name not in groups._get_expert_parallel_group_dict():
            groups._create_expert_and_data_parallel(expert_degree)
        ep_rank = groups._get_expert_parallel_rank(name)
        local = self.moe.num_local_experts
        with torch.no_grad():
            self.gate.wg.weight.copy_(plain.router.weight)
            for i, expert in enumerate(self.moe.deepspeed_moe.experts.deepspeed_experts):
                expert.load_state_dict(plain.experts[ep_rank * local + i].state_dict())
        self.aux_loss: torch.Tensor | None = None
        self.expert_load: torch.Tensor | None = None

    @property
    def gate(self) -> nn.Module:
        return self.moe.deepspeed_moe.gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _, _ = self.moe(x)
        # Mixtral's loss from the same fp32 router logits DeepSpeed's gate routes by (see module docstring).
        probs = F.softmax(F.linear(x.reshape(-1, x.shape[-1]).float(), self.gate.wg.weight.float()), dim=-1)
        self.aux_loss, self.expert_load = self._load_balancing_loss(probs, probs.topk(self.top_k, dim=-1).indices)
        return out


def apply_expert_parallel(blocks: nn.ModuleList, expert_degree: int, load_balancing_loss: LoadBalancingLoss) -> int:
    """Replaces every MoE block's `mlp` with ExpertParallelMoE (needs torch.distributed initialised).
    Returns how many were replaced. Every rank must hold the same plain weights (same seed)."""
    replaced = 0
    for block in blocks:
        if is_moe_block(block.mlp):
            block.mlp = ExpertParallelMoE(block.mlp, expert_degree, load_balancing_loss)
            replaced += 1
    return replaced


def expert_parallel_problems(expert: int, n_experts: int, data_parallel: int | None, zero_stage: int,
                             pipeline_stages: int) -> list[str]:
    """Why `parallel.expert` (or a mixture of experts at all) cannot run with this model and launch (empty when it can).
    data_parallel: the data-parallel replicas (None: world size unknown yet)."""
    found = []
    if n_experts and pipeline_stages > 1:  # the pipeline's loss function sees only logits, not the routers
        found.append(f"parallel.pipeline_stages = {pipeline_stages}: a mixture of experts (model.n_experts = {n_experts}) "
                     "is not supported with pipelines (the load-balancing loss would be dropped); use 1")
    if expert == 1:
        return found
    if not n_experts:
        found.append(f"parallel.expert = {expert}: the model has no experts; set model.n_experts or parallel.expert = 1")
    elif n_experts % expert:
        found.append(f"parallel.expert = {expert}: must divide model.n_experts = {n_experts}")
    if data_parallel is not None and data_parallel % expert:
        found.append(f"parallel.expert = {expert}: must divide the {data_parallel} data-parallel ranks (experts are spread over them)")
    if zero_stage == 3:
        found.append(f"parallel.expert = {expert}: DeepSpeed's MoE layers do not support ZeRO-3; use a ZeRO-0/1/2 deepspeed.config")
    if pipeline_stages > 1 and not n_experts:
        found.append(f"parallel.expert = {expert}: not supported with parallel.pipeline_stages = {pipeline_stages}")
    return found
