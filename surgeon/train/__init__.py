"""Training: the loop (trainer.py), step budget and lr schedule (schedule.py), the objective with
MoSA's regularisers (regularizers.py), checkpoints and RNG state (checkpoint.py), progress
display (progress.py), and the ``surgeon apply`` sequence (apply.py)."""
from .apply import apply_recipe
from .trainer import Trainer, TrainingDiverged

__all__ = ["Trainer", "TrainingDiverged", "apply_recipe"]
