"""LightningModules, one per task; ``NonFiniteGuardMixin`` gives any task the ``on_nonfinite`` stop/skip switch."""
from chanzoo.tasks.classification import ClassificationTask
from chanzoo.tasks.guard import NonFiniteError, NonFiniteGuardMixin
from chanzoo.tasks.restoration import RestorationTask

__all__ = ["ClassificationTask", "NonFiniteError", "NonFiniteGuardMixin", "RestorationTask"]
