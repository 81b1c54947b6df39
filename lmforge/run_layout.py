"""The one place that names a run directory's files (RUN_DIR is `run.dir`; docs/formats.md describes each).

    RUN_DIR/config.yaml         the resolved config the run was started with (PretrainConfig or PosttrainConfig)
    RUN_DIR/checkpoints/        one folder per saved step (step_00000010/ ...), `latest` naming the newest
    RUN_DIR/metrics.jsonl       one JSON object per logged step (pretrain.metrics)
    RUN_DIR/tb/                 TensorBoard event files
    RUN_DIR/tokenizer.model     post-training's copy of its tokenizer (also beside every shard directory)
    RUN_DIR/hf_tokenizer/       the source model's tokenizer files `lmforge import-hf` kept
    RUN_DIR/critic/             PPO's critic checkpoints
    RUN_DIR/loss.png            `lmforge plot`'s output
    RUN_DIR/.deepspeed_env      the variables DeepSpeed's multi-node runner exports (launch.environment)

Inside a checkpoint folder: COMPLETE (the record written last), DAMAGED (a record found not to match
its files), and universal/ (a DeepSpeed universal-checkpoint conversion); see pretrain.checkpoint.
"""
from __future__ import annotations

from pathlib import Path

CONFIG_FILE = "config.yaml"
CHECKPOINTS_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
TOKENIZER_COPY = "tokenizer.model"
SOURCE_TOKENIZER_DIR = "hf_tokenizer"
CRITIC_DIR = "critic"
LOSS_PLOT = "loss.png"
DEEPSPEED_ENV_FILE = ".deepspeed_env"
LATEST_FILE = "latest"
COMPLETE_MARKER = "COMPLETE"
DAMAGED_MARKER = "DAMAGED"
UNIVERSAL_DIR = "universal"


def config_path(run_dir: Path) -> Path:
    return Path(run_dir) / CONFIG_FILE


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def metrics_path(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS_FILE

# In every folder lmforge creates (lmforge.ownership): what made it; and a run directory's lock (lmforge.run_lock).
OWNER_FILE = ".lmforge-owner.json"
LOCK_FILE = ".lock"
