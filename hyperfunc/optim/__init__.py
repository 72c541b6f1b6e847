"""Stateless functional inner optimizers over TensorDicts."""

from ._base import Arg, Optimizer
from .adam import adam
from .sgd import sgd
from .sgld import sgld

__all__ = ["Arg", "Optimizer", "adam", "sgd", "sgld"]
