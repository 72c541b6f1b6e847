"""Stateless functional inner optimizers over TensorDicts."""

from ._base import Arg, Optimizer, pick
from .adam import adam
from .adamw import adamw
from .rmsprop import rmsprop
from .sgd import sgd
from .sgld import sgld

__all__ = ["Arg", "Optimizer", "adam", "adamw", "pick", "rmsprop", "sgd", "sgld"]
