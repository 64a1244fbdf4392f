"""Training: run config, optimizer, the one step builder (`make_step`), checkpoints, metrics, loop.

from jaxllm.train import RunConfig, train
train(RunConfig(steps=100), "runs/tiny")
"""

from jaxllm.train.checkpoint import CheckpointError
from jaxllm.train.config import ConfigError, RunConfig, apply_overrides, load_config
from jaxllm.train.loop import NonFiniteLossError, TrainResult, train
from jaxllm.train.models import build_model
from jaxllm.train.step import LossOutput, make_step

__all__ = [
    "CheckpointError",
    "ConfigError",
    "LossOutput",
    "NonFiniteLossError",
    "RunConfig",
    "TrainResult",
    "apply_overrides",
    "build_model",
    "load_config",
    "make_step",
    "train",
]
