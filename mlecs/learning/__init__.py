"""Training and evaluation of edge models (imports torch)."""

from mlecs.learning.supervised import TrainStats, evaluate, to_inputs, train_supervised

__all__ = ["TrainStats", "evaluate", "to_inputs", "train_supervised"]
