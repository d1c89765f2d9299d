"""Continual learning: task sequences, methods (CLR and its baselines), the accuracy matrix and its metrics.

``python train.py task=continual ...`` runs ``chanzoo.continual.runner.run_continual``.
"""
from chanzoo.continual.methods import METHODS, ContinualMethod, create_method
from chanzoo.continual.sequence import SequenceTask, build_sequence

__all__ = ["METHODS", "ContinualMethod", "SequenceTask", "build_sequence", "create_method"]
