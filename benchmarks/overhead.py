"""Throughput of one replica: what Ray Train, the broker exchange and all-reduce cost a step.

Measured, all on the same machine and the same resources (R replicas x W workers at
`cpus_per_worker` CPUs each, as in the config; MNIST-1D CNN by default):

- plain:        the training loop in plain PyTorch, no Ray: the same model, batch, optimizer, data
                order and torch threads as a Ray worker gets; R such loops run at once, in R
                processes, as the R replicas do (the limit on this machine);
- plain+KL:     the same, plus the distillation term against a fixed teacher (no exchange):
                what the loss itself costs, apart from any communication;
- independent:  R replicas through the launcher (Ray Train), alpha = 0, no exchange;
- logits:       codistill, teachers from the broker's stored logits;
- weights:      codistill, peers' weights from the broker, one extra forward pass per peer;
- allreduce:    one model on R x W workers (DDP); its figure is per worker.

Each Ray configuration is a real experiment, `ray_codistill.launcher.run(cfg)`. Throughput is
the column `perf/samples_per_s` of its `metrics.parquet` (the worker times each step from taking
the batch to publishing its logits; evaluation, probes and metric rows stay out): per replica the
median over the rows after burn-in and warm-up, then the mean over replicas; the plain loops are
timed the same way, in windows of `log_every` steps. Configurations are interleaved (the order
rotates every repeat) and the table shows the median over `--repeats`, so a burst of load from
elsewhere on the machine hits every configuration alike.

    python benchmarks/overhead.py [--config configs/mnist1d.yaml] [--repeats 3] [--steps 3000]
                                  [--set key=value ...] [--quick]
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import sys
import time

from common import (Clock, command, experiment_parser, load_average, machine, out_folder, run_experiment,
                    start_ray, steady_rate, worker_torch_threads)

from ray_codistill.config import ExperimentConfig, load_config
from ray_codistill.fmt import markdown_table

RAY_RUNS = {  # name -> overrides of the base config
    "independent": {"method": "independent"},
    "logits": {"method": "codistill", "codistill.exchange": "logits"},
    "weights": {"method": "codistill", "codistill.exchange": "weights"},
    "allreduce": {"method": "allreduce"},
}
TARGETS = {"logits": 0.97, "weights": 0.72}  # of independent, stated by issue #7 for this machine


def plain_loop(cfg_dict: dict, replica: int, threads: int, skip_steps: int, distill: bool) -> float:
    """One replica's loop without Ray (runs in its own process); samples/s as the workers time it."""
    import torch

    from ray_codistill.data import load_splits, train_batches
    from ray_codistill.loss import codistill_loss
    from ray_codistill.models import build_model
    from ray_codistill.optim import build_optimizer
    from ray_codistill.replica import replica_seed

    torch.set_num_threads(threads)
    cfg = ExperimentConfig.from_dict(cfg_dict)
    splits = load_splits(cfg.data)
    seed = replica_seed(cfg.seed, replica)
    torch.manual_seed(seed)
    model = build_model(cfg.model, splits.input_shape, splits.num_classes)
    optimizer, scheduler = build_optimizer(cfg.optim, model, cfg.steps)
    batches = train_batches(splits.train, cfg.batch_size, seed, 0, 1, num_workers=cfg.data.num_workers)
    teacher = torch.randn(cfg.batch_size, splits.num_classes) if distill else None
    cc, rates, seen, elapsed = cfg.codistill, [], 0, 0.0
    model.train()
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        x, y, _ = next(batches)
        logits = model(x)
        loss, _, _ = codistill_loss(logits, y, teacher, None, cc.alpha if distill else 0.0, cc.distance,
                                    cc.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        elapsed += time.perf_counter() - t0
        seen += y.numel()
        if (step + 1) % cfg.log_every == 0:
            if step + 1 > skip_steps:
                rates.append(seen / elapsed)
            seen, elapsed = 0, 0.0
    return statistics.median(rates)


def run_plain(cfg: ExperimentConfig, threads: int, skip_steps: int, distill: bool) -> float:
    """R plain loops at once, one process each (as R replicas share the machine); mean of their rates."""
    with mp.get_context("spawn").Pool(cfg.replicas) as pool:
        rates = pool.starmap(plain_loop, [(cfg.to_dict(), r, threads, skip_steps, distill)
                                          for r in range(cfg.replicas)])
    return statistics.mean(rates)


def run_ray(cfg: ExperimentConfig, skip_steps: int, log_path) -> float:
    import pandas as pd
    result = run_experiment(cfg, log_path)
    rate = steady_rate(pd.read_parquet(result.path / "metrics.parquet"), skip_steps)
    return rate / cfg.workers_per_model  # allreduce reports its model's rate: per worker here


def main(argv: list[str] | None = None) -> int:
    parser = experiment_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration (median shown)")
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps per run")
    parser.add_argument("--quick", action="store_true", help="1 repeat of 1,500 steps: a few minutes")
    parser.add_argument("--runs", nargs="+", choices=["plain+KL", *RAY_RUNS], default=["plain+KL", *RAY_RUNS],
                        help="configurations to run besides plain and independent (default: all)")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.steps = 1, 1500

    out = out_folder(args.out, "overhead")
    base = load_config(args.config, args.set, steps=args.steps, storage_path=str(out))
    base = base.replace(eval_every=base.steps)  # one evaluation, at the end: less wall time per run
    cc = base.codistill
    # rows up to here are warm-up: burn-in (no teachers yet), the ramp, then two more rows
    skip_steps = cc.burn_in + cc.ramp_steps + 2 * base.log_every
    if skip_steps + 4 * base.log_every > base.steps:
        parser.error(f"--steps {base.steps} leaves too few metric rows after warm-up (step {skip_steps}); "
                     f"use at least {skip_steps + 4 * base.log_every}")

    start_ray()
    threads = worker_torch_threads(base.cpus_per_worker)
    clock = Clock()
    print(f"machine: {machine()}")
    print(f"command: {command()}")
    print(f"config: {args.config} {' '.join(args.set)}; {base.replicas} replicas x {base.workers_per_replica} "
          f"worker(s) x {base.cpus_per_worker:g} CPU, batch {base.batch_size}/worker, model {base.model.name}, "
          f"{base.steps} steps, rows after step {skip_steps} measured; torch threads per worker: {threads}; "
          f"exchange_batches {cc.exchange_batches}, exchange_every {cc.exchange_every}")
    print(f"results and logs: {out}; load average at start: {load_average()}", flush=True)

    names = [n for n in ["plain", "plain+KL", *RAY_RUNS] if n in ("plain", "independent", *args.runs)]
    rates: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(args.repeats):
        order = names[rep % len(names):] + names[:rep % len(names)]  # rotate: no configuration always first
        for name in order:
            if name.startswith("plain"):
                rate = run_plain(base, threads, skip_steps, distill=name == "plain+KL")
            else:
                cfg = base.replace(name=f"overhead-{name}-{rep}", **RAY_RUNS[name])
                rate = run_ray(cfg, skip_steps, out / "launcher.log")
            rates[name].append(rate)
            print(f"[{clock}] repeat {rep + 1}/{args.repeats} {name:<11} {rate:9.0f} samples/s per replica "
                  f"(load average {load_average()})", flush=True)

    med = {n: statistics.median(v) for n, v in rates.items()}
    rows = [[n, f"{med[n]:,.0f}", " ".join(f"{v:,.0f}" for v in rates[n]), f"{med[n] / med['plain']:.3f}",
             f"{med[n] / med['independent']:.3f}"] for n in names]
    print(f"\nsamples/s of one replica (allreduce: of one worker), median of {args.repeats} "
          f"(load average at the end: {load_average()})\n")
    print(markdown_table(["run", "samples/s", "each repeat", "/ plain", "/ independent"], rows))
    for name, target in ((n, t) for n, t in TARGETS.items() if n in med):
        ratio = med[name] / med["independent"]
        print(f"{name}/independent = {ratio:.3f} (target >= {target}: {'met' if ratio >= target else 'NOT met'})")
    if "plain+KL" in med:
        print(f"plain+KL/plain = {med['plain+KL'] / med['plain']:.3f} (the distillation term alone, no exchange)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
