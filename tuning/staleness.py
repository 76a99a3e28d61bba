"""Staleness search: logits exchange (max_staleness) vs weights exchange (exchange_every)
(tuning/spaces/staleness.yaml).

    python tuning/staleness.py configs/mnist1d.yaml [--samples N] [--scheduler asha] [--set k=v ...]
"""

import sys

from ray_codistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:2], "--space", "tuning/spaces/staleness.yaml", *sys.argv[2:]]))
