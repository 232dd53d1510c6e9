"""Forced callbacks added to the ``train.py`` parser (configured under their own top-level keys)."""

from __future__ import annotations

from lightning.pytorch.cli import LightningArgumentParser


def add_callback_arguments(parser: LightningArgumentParser) -> None:
    """Placeholder-free hook: callbacks register here as they are added to the package."""
