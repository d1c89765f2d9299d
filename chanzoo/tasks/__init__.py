"""LightningModules, one per task."""
from chanzoo.tasks.classification import ClassificationTask

__all__ = ["ClassificationTask"]
