"""Adversarial training with a pluggable inner maximiser: ``python train.py --inner pqgd --steps 10``."""

import sys

try:
    from qgtrain.cli.train import main
except KeyboardInterrupt:  # Ctrl-C while the libraries load: nothing has started
    sys.stderr.write("train.py: interrupted while starting; nothing was run\n")
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
