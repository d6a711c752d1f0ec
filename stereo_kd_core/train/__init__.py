"""Training: YAML recipes and the one trainer (supervised training, distillation and adapt are
its recipes), the teacher-output caches, and the adapt run."""

from stereo_kd_core.train.recipe import RecipeError, load_recipe, validate_recipe
from stereo_kd_core.train.trainer import NonFiniteLossError, Trainer, run_training

__all__ = ["NonFiniteLossError", "RecipeError", "Trainer", "load_recipe", "run_training", "validate_recipe"]
