"""The engine every pruning app shares: data, models, the training loop (`fit`, DDP, AMP, exact resume),
checkpoints and verified export. An app is a `Method` (ResRep, C-SGD …) the loop calls back."""

from .checkpoint import CheckpointError, load_file
from .data import DataConfig, DataError, DataInfo, build_loaders
from .export import FORMATS, ExportError, export_model
from .loop import Hooks, Method, NonFiniteLossError, OptimConfig, TrainConfig, evaluate, fit, sgd
from .models import ModelConfig, ModelError, build_model, deploy_shell, load_weights

__all__ = [
    "FORMATS",
    "CheckpointError",
    "DataConfig",
    "DataError",
    "DataInfo",
    "ExportError",
    "Hooks",
    "Method",
    "ModelConfig",
    "ModelError",
    "NonFiniteLossError",
    "OptimConfig",
    "TrainConfig",
    "build_loaders",
    "build_model",
    "deploy_shell",
    "evaluate",
    "export_model",
    "fit",
    "load_file",
    "load_weights",
    "sgd",
]
