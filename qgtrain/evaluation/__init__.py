"""Robustness evaluation shared by ``evaluate.py`` and the training callbacks."""

from qgtrain.evaluation.protocol import (
    Batches,
    adversarial_correct,
    clean_correct,
    eval_mode,
    iterate_batches,
)

__all__ = ["Batches", "adversarial_correct", "clean_correct", "eval_mode", "iterate_batches"]
