"""Training: run configs, the training loop, checkpoints, optimiser and schedule."""

from .checkpoint import load_checkpoint, save_checkpoint
from .engine import evaluate, fit, format_summary, read_run_config
from .run_config import DataConfig, RunConfig, TrainConfig

__all__ = ["DataConfig", "RunConfig", "TrainConfig", "evaluate", "fit", "format_summary", "load_checkpoint",
           "read_run_config", "save_checkpoint"]
