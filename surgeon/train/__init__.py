"""Training: the loop (trainer.py), step budget and lr schedule (schedule.py), the objective with
MoSA's regularisers (regularizers.py), resumable checkpoints (checkpoint.py), accuracy under the
inference mechanisms (evaluation.py), progress display (progress.py). The ``surgeon apply``
sequence that drives them is :mod:`surgeon.apply`."""
from .trainer import Trainer, TrainingDiverged, TrainingStopped

__all__ = ["Trainer", "TrainingDiverged", "TrainingStopped"]
