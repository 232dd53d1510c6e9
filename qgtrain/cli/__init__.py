"""Command-line entry points: ``train.py`` (LightningCLI + short flags) and ``evaluate.py``."""
