"""More than two replicas: each teacher rule (alpha chosen on validation), independent replicas
and all-reduce (learning rate chosen on validation) at every R, then a table and a plot against R
(tuning/spaces/replicas.yaml).

    python tuning/replicas.py configs/mnist1d.yaml [--replicas 2 3 4 8] [--cpus 2] [--set k=v ...]
"""

import sys

from ray_codistill.cli import main

if __name__ == "__main__":
    args = sys.argv[2:] if "--replicas" in sys.argv else ["--replicas", "2", "3", "4", "8", *sys.argv[2:]]
    sys.exit(main(["tune", *sys.argv[1:2], "--space", "tuning/spaces/replicas.yaml", *args]))
