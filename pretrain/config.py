"""The pretraining job config: one typed section per concern, loaded from `configs/*.yaml`.

Sections: `run` (where outputs go), `model` (pretrain.model.ModelConfig), `data` (which shards),
`train` (optimisation and loop), `deepspeed` (which DeepSpeed JSON). Values that DeepSpeed must
also know are merged into its JSON by `pretrain.ds_config.build_deepspeed_config`, nowhere else.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from lmforge.config import load_config
from parallel.config import ParallelConfig
from pretrain.model import ModelConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class RunConfig:
    dir: Path = Path("runs/default")
    """Run directory: checkpoints/, metrics.jsonl, tb/, config.yaml. Rerunning resumes from it."""
    log_interval: int = 10
    """Optimizer steps between metric lines (loss is synced to the host only then)."""
    tensorboard: bool = True
    """Also write the metrics to RUN_DIR/tb/ with torch's TensorBoard writer."""
    progress_bar: bool = True
    """A tqdm bar on rank 0."""
    resume_fallback: bool = False
    """If the checkpoint `latest` names is damaged, resume from the newest intact older one (else stop)."""

    def problems(self) -> list[str]:
        return [] if self.log_interval >= 1 else [f"run.log_interval = {self.log_interval}: must be at least 1"]


@dataclass(frozen=True)
class DataConfig:
    path: tuple[Path, ...] = (Path("data/stdlib"),)
    """Shard directories written by `lmforge prep shards` (several are blended)."""
    weights: tuple[float, ...] | None = None
    """Blending weights, one per path; null weighs all paths equally."""
    document_masking: bool = False
    """Attention stays within each document of a packed sequence (a document ends at its EOD token) and positions restart after each EOD; false attends across them."""

    def problems(self) -> list[str]:
        found = []
        if not self.path:
            found.append("data.path: expected at least one shard directory")
        if self.weights is not None:
            if len(self.weights) != len(self.path):
                found.append(f"data.weights has {len(self.weights)} values: expected one per data.path ({len(self.path)})")
            if any(w < 0 for w in self.weights) or not sum(self.weights) > 0:
                found.append(f"data.weights = {list(self.weights)}: expected non-negative numbers with a positive sum")
        return found


@dataclass(frozen=True)
class TrainConfig:
    max_steps: int = 100
    """Optimizer steps to train for (the cosine schedule ends here, at min_lr)."""
    seed: int = 1234
    """Seeds weights, data order and every RNG."""
    micro_batch_size: int = 8
    """Sequences per rank per forward pass (DeepSpeed's train_micro_batch_size_per_gpu)."""
    grad_accum_steps: int = 1
    """Micro-batches per optimizer step (DeepSpeed's gradient_accumulation_steps)."""
    seq_len: int = 128
    """Tokens per training sequence (at most model.max_seq_len)."""
    lr: float = 3e-4
    """Peak learning rate, reached after warmup."""
    min_lr: float = 3e-5
    """Learning-rate floor at the end of the cosine decay."""
    warmup_steps: int = 10
    """Linear warmup steps: step k <= warmup_steps at lr * (k - 1) / warmup_steps (docs/parity.md)."""
    weight_decay: float = 0.1
    """AdamW weight decay on 2-D weights (never on norms and biases)."""
    decay_embeddings: bool = False
    """Also decay the embedding tables (and so a head tied to them); false exempts them."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (DeepSpeed's gradient_clipping); 0 disables it."""
    save_interval: int = 0
    """Steps between checkpoints; 0 saves only at the end."""
    keep_last: int = 3
    """Checkpoints kept on disk (older ones are deleted after a newer one is complete)."""
    checkpoint_writer: Literal["auto", "background", "blocking"] = "auto"
    """How a save writes: "background" stops training only to copy the state to host memory (as much host memory as this rank's share of a checkpoint, kept for the next save) and writes the files from a thread; "blocking" writes them before training goes on; "auto" is background unless ZeRO offloads to the host or the DeepSpeed JSON sets checkpoint.writer (docs/performance.md)."""
    eval_interval: int = 0
    """Steps between evaluations on the valid split; 0 evaluates only at the end."""
    eval_batches: int = 4
    """Micro-batches per rank in one evaluation."""
    compile: bool = False
    """torch.compile the model (worth it on GPU; slow to start on CPU)."""
    compile_scope: Literal["model", "nested", "blocks"] = "model"
    """What torch.compile compiles (pretrain.engine.compile_in_place): the whole model; the whole model with each block
    a nested compile region lowered once for every layer (one graph; a faster start on the CPU only, not with
    train.float8); or each block alone (one compilation reused by every layer: the fastest start, a region and its
    guards per block). gpt2-124m on a fresh H100 from empty caches: first step 32-35.5 / 37.6 / 13.5 s (a plain PyTorch
    script: 37.5-46 s); per step, blocks ran 0.84-0.92x the whole model's speed (docs/performance.md)."""
    compile_mode: Literal["default", "max-autotune-no-cudagraphs", "reduce-overhead"] = "default"
    """torch.compile's mode: "max-autotune-no-cudagraphs" searches matmul kernels (minutes more to start),
    "reduce-overhead" replays the model's kernels as CUDA graphs (docs/performance.md has both measured)."""
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """adamw: DeepSpeed's AdamW from the JSON (fp32 weights and moments, 16 bytes per parameter); adamw8bit: bf16
    weights and torchao's 8-bit AdamW with stochastic rounding (6 bytes; numerics/adamw8bit.py), with
    ds_configs/zero0_adamw8bit.json: for models whose fp32 states do not fit (llama-13b on one H200)."""
    float8: Literal["off", "tensorwise", "rowwise", "auto"] = "off"
    """FP8 matmuls in the blocks' linear layers (torchao float8 training, numerics/float8.py; a GPU of
    compute capability >= 8.9 and torchao): a scale per tensor, or per row (more accurate, slower); auto:
    tensorwise where the GPU and torchao allow it, else off (the llama-1b preset: faster there, same loss)."""
    max_bad_steps: int = 5
    """Consecutive optimizer steps with a non-finite loss or gradient (each skipped) that stop training."""

    def problems(self) -> list[str]:
        found = []
        for key in ("max_steps", "micro_batch_size", "grad_accum_steps", "seq_len", "eval_batches", "keep_last", "max_bad_steps"):
            if getattr(self, key) < 1:
                found.append(f"train.{key} = {getattr(self, key)}: must be at least 1")
        for key in ("save_interval", "eval_interval", "warmup_steps", "weight_decay", "grad_clip"):
            if getattr(self, key) < 0:
                found.append(f"train.{key} = {getattr(self, key)}: must not be negative")
        if not 0 < self.lr:
            found.append(f"train.lr = {self.lr}: must be positive")
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                found.append(f"train.{key} = {getattr(self, key)}: must be in [0, 1) (AdamW's moment decay)")
        if not self.adam_eps > 0:
            found.append(f"train.adam_eps = {self.adam_eps}: must be positive (it keeps AdamW's division finite)")
        if not 0 <= self.seed < 2**63:
            found.append(f"train.seed = {self.seed}: must be in [0, 2**63) (a 64-bit RNG seed)")
        if not 0 <= self.min_lr <= self.lr:
            found.append(f"train.min_lr = {self.min_lr}: must be between 0 and train.lr = {self.lr}")
        if self.warmup_steps > self.max_steps:
            found.append(f"train.warmup_steps = {self.warmup_steps}: must not exceed train.max_steps = {self.max_steps}")
        if self.compile and self.compile_scope == "blocks" and self.compile_mode == "reduce-overhead":
            # Measured on an H200: evaluation reads a block's output after the next block's graph replayed over it.
            found.append("train.compile_mode = reduce-overhead: not supported with train.compile_scope = blocks "
                         "(CUDA graphs of one block reused by every layer overwrite each other's outputs); use compile_scope: model")
        return found


@dataclass(frozen=True)
class DeepSpeedSection:
    config: Path = Path("ds_configs/zero1.json")
    """DeepSpeed's own JSON (ZeRO stage, precision, offload, activation checkpointing)."""
    one_rank_zero0: bool = True
    """On a world of one rank, a ZeRO-1/2/3 JSON (no offload, torch_autocast or fp32) runs as ZeRO-0: the same
    arithmetic, less GPU work per step; false runs the JSON's stage (e.g. to try a ZeRO-1 or ZeRO-3 setup on one GPU)."""


@dataclass(frozen=True)
class PretrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def problems(self) -> list[str]:
        found = []
        if self.train.seq_len > self.model.max_seq_len:
            found.append(f"train.seq_len = {self.train.seq_len}: must not exceed model.max_seq_len = {self.model.max_seq_len}")
        for key in ("pipeline_stages", "sequence"):  # stages pass hidden states only; Ulysses splits the sequence
            if self.data.document_masking and getattr(self.parallel, key) > 1:
                found.append(f"data.document_masking = true: not supported with parallel.{key} = "
                             f"{getattr(self.parallel, key)}; set one of them back (document_masking false or {key} 1)")
        return found


def resolve_repo_path(path: Path) -> Path:
    """A relative path as given if it exists from the working directory, else from the repo root."""
    if path.is_absolute() or path.exists():
        return path
    candidate = REPO_ROOT / path
    return candidate if candidate.exists() else path


def resolve_config_path(name_or_path: str | Path) -> Path:
    """`tiny` -> configs/tiny.yaml; a path is returned as given (or found from the repo root)."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml") and not path.exists():
        path = REPO_ROOT / "configs" / f"{path}.yaml"
    return resolve_repo_path(path)


def load_pretrain_config(path: str | Path | None, overrides: Sequence[str] = ()) -> PretrainConfig:
    """Loads a YAML preset (name or path) with `section.key=value` overrides; one error for all problems."""
    return load_config(PretrainConfig, resolve_config_path(path) if path is not None else None, overrides)
