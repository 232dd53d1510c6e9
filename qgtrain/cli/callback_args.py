"""Forced callbacks added to the ``train.py`` parser (configured under their own top-level keys)."""

from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser

from qgtrain.callbacks import AttackVisualization, RobustnessEvaluation


def add_callback_arguments(parser: LightningArgumentParser) -> None:
    """``robustness:`` (:class:`RobustnessEvaluation`) and ``visualization:`` (:class:`AttackVisualization`)."""
    parser.add_lightning_class_args(RobustnessEvaluation, "robustness")
    parser.add_lightning_class_args(AttackVisualization, "visualization")
