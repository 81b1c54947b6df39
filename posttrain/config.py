"""The post-training job config (`lmforge sft|reward|ppo|dpo|grpo`): typed sections from `configs/posttrain/*.yaml`.

Sections: `run`, `train` and `deepspeed` are pretraining's own (pretrain.config), so the same
DeepSpeed JSONs and the same merge (`pretrain.ds_config.build_deepspeed_config`) apply; `model` is
pretraining's ModelConfig, used only for a model built from scratch; with `init.from_run` it comes
from that run's config.yaml. `init` says where the weights and the tokenizer come from, `data`
which JSONL files are read, `ppo`, `dpo` and `grpo` hold what only those verbs use, `lora` the
adapters of a LoRA fine-tune.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

from lmforge.config import load_config, parse_overrides, read_yaml_mapping
from lmforge.errors import LmforgeError
from pretrain.config import REPO_ROOT, DeepSpeedSection, RunConfig, TrainConfig, resolve_repo_path
from pretrain.model import ModelConfig


@dataclass(frozen=True)
class InitConfig:
    from_run: Path | None = None
    """Run directory (lmforge train, sft, dpo, import-hf, ...) whose checkpoint gives the starting weights; null: random init from `model`."""
    tag: str | None = None
    """Checkpoint tag in from_run (e.g. step_00000200); null: its latest."""
    tokenizer: Path | None = None
    """tokenizer.model (or its directory); null: the one from_run was trained with."""


@dataclass(frozen=True)
class PosttrainDataConfig:
    train: Path | None = None
    """JSONL of examples: sft {prompt, response} or {messages}; reward/dpo {prompt, chosen, rejected}; ppo {prompt}."""
    valid: Path | None = None
    """Held-out JSONL of the same kind; null splits valid_fraction of `train` off by a hash of each line."""
    valid_fraction: float = 0.05
    """Share of `train` held out when `valid` is null (0 disables evaluation)."""
    max_prompt_len: int = 128
    """Prompt tokens kept (the oldest are cut first); the response fills the rest of train.seq_len."""
    packing: bool = False
    """SFT: pack several examples into each train.seq_len row instead of padding one per row (each attends only within itself)."""

    def problems(self) -> list[str]:
        found = []
        if not 0.0 <= self.valid_fraction < 1.0:
            found.append(f"data.valid_fraction = {self.valid_fraction}: must be in [0, 1)")
        if self.max_prompt_len < 1:
            found.append(f"data.max_prompt_len = {self.max_prompt_len}: must be at least 1")
        return found


@dataclass(frozen=True)
class PPOConfig:
    reward_run: Path | None = None
    """Reward-model run directory (`lmforge reward`) that scores each rollout."""
    reward_function: str | None = None
    """A programmatic reward instead: a name in posttrain.reward_functions (digit_fraction, python_syntax) or module:function."""
    monitor_function: str | None = None
    """A programmatic score logged as `monitor` for each rollout batch, not optimised (e.g. python_syntax with a reward model)."""
    critic_from: Literal["auto", "reward", "policy"] = "auto"
    """The critic's starting weights: the reward model's (as DeepSpeed-Chat), or the policy's trunk with a zero head; auto: reward when ppo.reward_run is set."""
    rollout_batch_size: int = 16
    """Prompts per rank per PPO iteration (train.max_steps counts iterations)."""
    max_new_tokens: int = 64
    """Response tokens sampled per prompt (fewer where EOD comes first)."""
    temperature: float = 1.0
    """Sampling temperature of rollouts; log-probabilities use the same temperature."""
    top_k: int = 0
    """Sample only from the k likeliest tokens (0: all; nonzero makes PPO slightly off-policy)."""
    epochs: int = 2
    """Passes over each rollout batch (in train.micro_batch_size × train.grad_accum_steps minibatches)."""
    clip_range: float = 0.2
    """Policy ratio clip ε."""
    value_clip_range: float = 0.2
    """Value-prediction clip around the rollout's values."""
    critic_lr: float = 5.0e-5
    """Critic peak learning rate (the actor uses train.lr; the schedule shape is shared)."""
    kl_coef: float = 0.05
    """Per-token KL penalty coefficient against the reference (the starting value when adaptive)."""
    kl_target: float | None = None
    """Adaptive KL: steer the per-sequence KL toward this value (Ziegler et al. 2019); null: fixed kl_coef."""
    kl_horizon: int = 10000
    """Adaptive KL: rollouts over which the coefficient may change by ±20%."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE λ."""
    whiten_rewards: bool = True
    """Normalise scores by a running mean and std over all ranks before the KL penalty is added."""
    reward_clip: float = 5.0
    """Clip (normalised) scores to ±this; 0 disables."""
    frozen_models: Literal["auto", "plain", "zero3"] = "auto"
    """Reference and reward models: plain modules, or ZeRO-3 inference engines; auto: zero3 when training with ZeRO-3."""

    def problems(self) -> list[str]:
        found = []
        for key in ("rollout_batch_size", "max_new_tokens", "epochs", "kl_horizon"):
            if getattr(self, key) < 1:
                found.append(f"ppo.{key} = {getattr(self, key)}: must be at least 1")
        for key in ("clip_range", "value_clip_range", "critic_lr", "temperature"):
            if not getattr(self, key) > 0:
                found.append(f"ppo.{key} = {getattr(self, key)}: must be positive")
        for key in ("kl_coef", "reward_clip", "top_k"):
            if getattr(self, key) < 0:
                found.append(f"ppo.{key} = {getattr(self, key)}: must not be negative")
        if self.kl_target is not None and not self.kl_target > 0:
            found.append(f"ppo.kl_target = {self.kl_target}: must be positive (or null for a fixed kl_coef)")
        if not (0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0):
            found.append(f"ppo.gamma = {self.gamma}, ppo.lam = {self.lam}: must be in [0, 1]")
        return found


@dataclass(frozen=True)
class DPOConfig:
    beta: float = 0.1
    """Strength of the implicit KL constraint: reward = beta × log(π / π_ref) of the response."""
    label_smoothing: float = 0.0
    """Probability that a preference label is flipped (conservative DPO); 0 is plain DPO."""
    reference: Literal["auto", "plain", "zero3"] = "auto"
    """The frozen reference: a plain module, or a ZeRO-3 inference engine; auto: zero3 when training with ZeRO-3."""

    def problems(self) -> list[str]:
        found = []
        if not self.beta > 0:
            found.append(f"dpo.beta = {self.beta}: must be positive")
        if not 0.0 <= self.label_smoothing < 0.5:
            found.append(f"dpo.label_smoothing = {self.label_smoothing}: must be in [0, 0.5)")
        return found


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 0
    """LoRA rank r (Hu et al. 2021) of the adapters added to target_modules (sft, reward, dpo, ppo, grpo); 0: no LoRA, every weight trains."""
    alpha: float = 16.0
    """Adapter scale numerator: the update is (alpha / rank)·B·A."""
    dropout: float = 0.0
    """Dropout on the adapters' input."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    """Linear layers of every block that get adapters: any of q_proj, k_proj, v_proj, o_proj, gate_proj (llama), up_proj, down_proj."""

    def problems(self) -> list[str]:
        found = []
        if self.rank < 0:
            found.append(f"lora.rank = {self.rank}: must not be negative (0 turns LoRA off)")
        if not self.alpha > 0:
            found.append(f"lora.alpha = {self.alpha}: must be positive")
        if not 0.0 <= self.dropout < 1.0:
            found.append(f"lora.dropout = {self.dropout}: must be in [0, 1)")
        if unknown := [m for m in self.target_modules if m not in LORA_TARGETS]:
            found.append(f"lora.target_modules: unknown {', '.join(unknown)}; expected some of {', '.join(LORA_TARGETS)}")
        if not self.target_modules:
            found.append("lora.target_modules: expected at least one module")
        return found


@dataclass(frozen=True)
class GRPOConfig:
    reward_function: str | None = "python_syntax"
    """The verifiable reward: a name in posttrain.reward_functions (digit_fraction, python_syntax) or module:function(prompts, responses) -> floats."""
    reward_run: Path | None = None
    """A reward-model run directory (`lmforge reward`) instead (set reward_function to null)."""
    group_size: int = 8
    """Responses sampled per prompt; advantages are relative to the group's rewards."""
    prompts_per_rank: int = 4
    """Prompts per rank per iteration (train.max_steps counts iterations): prompts_per_rank × group_size rollouts."""
    max_new_tokens: int = 64
    """Response tokens sampled per prompt (fewer where EOD comes first)."""
    temperature: float = 1.0
    """Sampling temperature of rollouts; log-probabilities use the same temperature."""
    top_k: int = 0
    """Sample only from the k likeliest tokens (0: all)."""
    epochs: int = 1
    """Updates per rollout batch: passes over it in train.micro_batch_size × train.grad_accum_steps minibatches (1 is on-policy)."""
    clip_range: float = 0.2
    """Policy ratio clip ε (acts from the second minibatch update of a batch on)."""
    kl_coef: float = 0.04
    """β of the k3 KL term to the frozen reference (DeepSeekMath's 0.04); 0 drops the reference."""
    scale_rewards: bool = True
    """Divide each group's centred rewards by its std + 1e-4 (GRPO); false: Dr. GRPO's unscaled advantages."""
    frozen_models: Literal["auto", "plain", "zero3"] = "auto"
    """Reference and reward model: plain modules, or ZeRO-3 inference engines; auto: zero3 when training with ZeRO-3."""

    def problems(self) -> list[str]:
        found = []
        for key in ("prompts_per_rank", "max_new_tokens", "epochs"):
            if getattr(self, key) < 1:
                found.append(f"grpo.{key} = {getattr(self, key)}: must be at least 1")
        if self.group_size < 2:
            found.append(f"grpo.group_size = {self.group_size}: must be at least 2 (advantages compare responses to one prompt)")
        for key in ("clip_range", "temperature"):
            if not getattr(self, key) > 0:
                found.append(f"grpo.{key} = {getattr(self, key)}: must be positive")
        for key in ("kl_coef", "top_k"):
            if getattr(self, key) < 0:
                found.append(f"grpo.{key} = {getattr(self, key)}: must not be negative")
        return found


@dataclass(frozen=True)
class PosttrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    init: InitConfig = field(default_factory=InitConfig)
    data: PosttrainDataConfig = field(default_factory=PosttrainDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def problems(self) -> list[str]:
        found = []
        if self.init.from_run is None and self.init.tokenizer is None:
            found.append("init.from_run and init.tokenizer are both null: set init.from_run=RUN_DIR, "
                         "or init.tokenizer=PATH to train a model from scratch")
        if self.data.max_prompt_len >= self.train.seq_len:
            found.append(f"data.max_prompt_len = {self.data.max_prompt_len}: must be below train.seq_len = "
                         f"{self.train.seq_len} (the response needs room)")
        return found


def resolve_posttrain_config_path(name_or_path: str | Path) -> Path:
    """`sft` -> configs/posttrain/sft.yaml; a path is returned as given (or found from the repo root)."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        path = REPO_ROOT / "configs" / "posttrain" / f"{path}.yaml"
    return resolve_repo_path(path)


# Pretraining's keys that post-training's loops (posttrain/loop.py, posttrain/ppo_trainer.py) do not
# act on yet: a user who sets one is told, instead of it being silently ignored.
NOT_YET_SUPPORTED = {
    "train.max_bad_steps": "the non-finite step guard runs in `lmforge train` only",
    "train.eval_batches": "post-training evaluates its whole valid split",
}


def unsupported_keys(data: dict[str, Any], overrides: Sequence[str]) -> list[str]:
    """One problem per key of NOT_YET_SUPPORTED set in the YAML mapping `data` or in `overrides`."""
    given = {f"{s}.{k}" for s, v in data.items() if isinstance(v, dict) for k in v}
    given |= {f"{s}.{k}" for s, v in parse_overrides(overrides).items() for k in v}
    return [f"{key}: not supported by post-training verbs yet ({why}); remove it"
            for key, why in NOT_YET_SUPPORTED.items() if key in given]


def load_posttrain_config(path: str | Path | None, overrides: Sequence[str] = ()) -> PosttrainConfig:
    """Loads a preset (name or path) with `section.key=value` overrides; one error for all problems."""
    source = resolve_posttrain_config_path(path) if path is not None else None
    if problems := unsupported_keys(read_yaml_mapping(source) if source is not None else {}, overrides):
        raise LmforgeError("; ".join(problems))
    return load_config(PosttrainConfig, source, overrides)
