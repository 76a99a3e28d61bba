"""Entry point for `ray job submit`: `ray-codistill compare` inside the job's cluster.

    ray job submit --working-dir . -- python jobs/compare.py configs/smoke.yaml [--set k=v ...]

The job's driver attaches to the cluster it runs in (Ray sets RAY_ADDRESS for it), prints where
the results are written, and exits non-zero when the config is refused (2) or the run fails (1).
"""

import sys

from ray_codistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
