"""LightningModules, one per task."""
from chanzoo.tasks.classification import ClassificationTask
from chanzoo.tasks.restoration import RestorationTask

__all__ = ["ClassificationTask", "RestorationTask"]
