"""Adversarial training with a pluggable inner maximiser: ``python train.py --inner pqgd --steps 10``."""

import sys

from qgtrain.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
