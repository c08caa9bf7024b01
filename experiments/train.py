"""The canonical entry point, same as `jaxft train` (for `python experiments/train.py ...`).

    python experiments/train.py train tiny --workdir /tmp/tiny --config.steps=50

The loop itself lives in `jaxft/runner.py` (importable from notebooks).
"""
import sys

from jaxft import cli

if __name__ == "__main__":
  sys.exit(cli.main())
