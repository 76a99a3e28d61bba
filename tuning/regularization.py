"""Regularisation-strength search: codistillation vs all-reduce (tuning/spaces/regularization.yaml).

    python tuning/regularization.py configs/mnist1d.yaml [--samples N] [--scheduler asha] [--set k=v ...]
"""

import sys

from ray_codistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:2], "--space", "tuning/spaces/regularization.yaml", *sys.argv[2:]]))
