"""The paper's evaluation protocol on a checkpoint: ``python evaluate.py --ckpt checkpoints/run/last.ckpt``."""

import sys

try:
    from qgtrain.cli.evaluate import main
except KeyboardInterrupt:  # Ctrl-C while the libraries load: nothing has started
    sys.stderr.write("evaluate.py: interrupted while starting; nothing was run\n")
    sys.exit(130)

if __name__ == "__main__":
    sys.exit(main())
