"""The paper's evaluation protocol on a checkpoint: ``python evaluate.py --ckpt checkpoints/run/last.ckpt``."""

import sys

from qgtrain.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
