"""Wall time by link rate: codistillation against all-reduce across real (emulated) network links.

An emulated cluster (`emulated/`: real Ray nodes in network namespaces, links shaped
with `tc tbf`, rate only): a head holding the broker and the driver, and two worker nodes of one
CPU each. Every run puts one replica (all-reduce: one worker) on each worker node, so everything a
replica exchanges crosses its node's link, and through the head's link for the broker.

For each link rate (unshaped, 1 Gbit/s, 100 Mbit/s, 10 Mbit/s; each link shaped both ways) and
each of two models, MNIST-1D, per-worker batch 100:
- codistill logits (teachers through the broker), codistill weights every 50 and every 500 steps
  (peers' models through Ray's object store), all-reduce (DDP, one worker per node, global batch
  200), independent replicas (no exchange: the ceiling);
- models: the MNIST-1D CNN (about 5k parameters: its logits per step are a sixth of its gradients,
  so the link can bind codistillation too) and an MLP of 1.05M parameters (`model.name=mlp`,
  hidden 1000), which trains MNIST-1D at tens of steps per second on one core.

Every run gets the same steps and the same wall-clock budget (`time_budget_s`), whichever ends it
first. Runs are repeated in interleaved order (repeat 1 of everything, then repeat 2, ...) and the
tables show medians. Per run: samples/s per worker (median over metric rows after the burn-in);
training wall time; time to a fixed validation accuracy that every method reaches unshaped (a run
that never reaches it within its budget shows "> budget" with its steps/s); final test accuracy
(mean over models); teacher age in steps (the median over rows of the mean age of the teachers
served); bytes through each worker node's link (both ways, from the `tc -s` counters, from `ip -s
link` when unshaped); compute utilisation (samples/s against independent replicas on the same links).

Needs root (namespaces, veth, tc). Run it alone: it measures speed on a shared 2-core machine.

    python benchmarks/bandwidth.py [--quick] [--repeats 3] [--out DIR] [--plot docs/img/bandwidth.png]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from common import REPO, Clock, command, load_average, machine, run_experiment, temp_root

from ray_codistill.config import load_config
from ray_codistill.data import load_splits
from ray_codistill.fmt import human_bytes, markdown_table
from ray_codistill.models import build_model, count_parameters
from ray_codistill.results import write_atomic

sys.path.insert(0, str(REPO))  # the emulated cluster: in the checkout, beside the package (not installed)
from emulated import EmulatedCluster, available  # noqa: E402

RATES = [None, 1000.0, 100.0, 10.0]  # Mbit/s each way; None: unshaped
METHODS = {
    "codistill logits": {"method": "codistill", "codistill.exchange": "logits"},
    "codistill weights/50": {"method": "codistill", "codistill.exchange": "weights", "codistill.exchange_every": 50},
    "codistill weights/500": {"method": "codistill", "codistill.exchange": "weights",
                              "codistill.exchange_every": 500},
    "allreduce": {"method": "allreduce"},
    "independent": {"method": "independent"},
}
# per model: its overrides, the steps and wall-clock budget of every run, and the validation
# accuracy whose time is measured (chosen so that every method reaches it unshaped: checked below)
MODELS = {
    "cnn": {"overrides": {"model.name": "mnist1d_cnn"}, "steps": 2000, "budget_s": 10.0, "target": 0.80},
    "mlp1m": {"overrides": {"model.name": "mlp", "model.hidden": 1000, "optim.lr": 0.001},
              "steps": 800, "budget_s": 15.0, "target": 0.50},
}
QUICK = {"rates": [None, 10.0], "methods": ["codistill logits", "allreduce", "independent"],
         "steps": {"cnn": 1000, "mlp1m": 300}, "budget_s": {"cnn": 8.0, "mlp1m": 8.0}}
COMMON = {"replicas": 2, "workers_per_replica": 1, "cpus_per_worker": 1.0, "use_gpu": False,
          "eval_every": 100, "log_every": 50, "checkpoint_every": 0, "codistill.probe_every": 0,
          "codistill.burn_in": 200, "codistill.alpha": 0.5,
          "placement.replica_labels": [{"emulated-node": "n1"}, {"emulated-node": "n2"}],
          "placement.broker_labels": {"emulated-node": "n0"}}
SKIP_STEPS = 200  # throughput: metric rows after this step (warm-up and burn-in left out)


def rate_name(rate: float | None) -> str:
    return "unshaped" if rate is None else f"{rate:g} Mbit/s"


def seconds(value: float | None, missing: str = "-") -> str:
    return missing if value is None or pd.isna(value) else f"{value:.1f} s"


# -- the driver: one process in the head's namespace runs every experiment -----------------------

def serve(out: Path) -> int:
    """Inner mode: read one JSON job per line (`{"overrides": {...}}`), run it through the launcher
    (attached to RAY_ADDRESS), answer with the experiment folder. One process for all runs: an
    interpreter that imports torch and attaches to Ray costs seconds."""
    base = load_config(REPO / "configs/mnist1d.yaml")
    for line in sys.stdin:
        job = json.loads(line)
        try:
            result = run_experiment(base.replace(**job["overrides"]), out / "launcher.log")
            answer = {"folder": str(result.path)}
        except Exception as err:  # noqa: BLE001 - reported to the outer process, which stops
            answer = {"error": f"{type(err).__name__}: {err}"}
        print(json.dumps(answer), flush=True)
    return 0


class Driver:
    def __init__(self, cluster: EmulatedCluster, out: Path) -> None:
        env = {**cluster.env, "RAY_ADDRESS": cluster.address, "PYTHONPATH": str(REPO)}
        self.log = open(out / "driver.log", "ab")
        self.proc = cluster.popen_in(0, [sys.executable, __file__, "--serve", "--out", str(out)], env=env,
                                     cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True)

    def run(self, overrides: dict) -> Path:
        self.proc.stdin.write(json.dumps({"overrides": overrides}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the driver exited ({self.proc.wait()}); see {self.log.name}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"run {overrides.get('name')} failed: {answer['error']}; see {self.log.name}")
        return Path(answer["folder"])

    def close(self, kill: bool = False) -> None:
        if kill and self.proc.poll() is None:  # interrupted mid-run: the cluster goes down anyway
            self.proc.kill()
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


# -- one run's figures ------------------------------------------------------------------------------

def figures(folder: Path, method: str, target: float, link: dict) -> dict:
    summary = json.loads((folder / "summary.json").read_text())
    metrics = pd.read_parquet(folder / "metrics.parquet")
    world = 2 if summary["method"] == "allreduce" else 1
    steady = metrics[metrics["step"] > SKIP_STEPS]
    if steady.empty:  # a run that never got past the warm-up (all-reduce over a slow link): all its rows
        steady = metrics
    per_model = steady.groupby("replica")["perf/samples_per_s"].median() / world
    reached, reached_step = [], []
    for _, rows in metrics.dropna(subset=["val/acc"]).groupby("replica"):
        hit = rows[rows["val/acc"] >= target]
        reached.append(float(hit["time_s"].iloc[0]) if len(hit) else None)
        reached_step.append(int(hit["step"].iloc[0]) if len(hit) else None)
    ages = steady["distill/teacher_age"].dropna() if "distill/teacher_age" in steady else pd.Series(dtype=float)
    wall = float(metrics["time_s"].max())
    steps = [r["steps"] for r in summary["replicas"]]
    return {"method": method, "samples_per_s": float(per_model.mean()), "wall_s": wall,
            "steps": float(np.mean(steps)), "steps_per_s": float(np.mean(steps)) / wall,
            # every model must reach the target: the slowest one's time
            "to_target_s": max(reached) if reached and None not in reached else None,
            "to_target_step": max(reached_step) if reached_step and None not in reached_step else None,
            "test_acc": summary["test_acc_mean"], "teacher_age": float(ages.median()) if len(ages) else None,
            "link_bytes": float(np.mean([b["out"] + b["in"] for b in link.values()])),
            "budget_reached": summary.get("budget_reached", False), "warm_only": bool(metrics["step"].max() <= SKIP_STEPS)}


def run_one(cluster: EmulatedCluster, driver: Driver, out: Path, model: str, method: str, steps: int,
            budget_s: float, rate: float | None, repeat: int) -> dict:
    name = f"bw-{model}-{method.replace(' ', '-').replace('/', '')}-{rate_name(rate).split()[0]}-{repeat}"
    overrides = {**COMMON, **MODELS[model]["overrides"], **METHODS[method], "steps": steps,
                 "time_budget_s": budget_s, "storage_path": str(out), "name": name}
    before = {i: cluster.link_bytes(i) for i in (1, 2)}
    folder = driver.run(overrides)
    after = {i: cluster.link_bytes(i) for i in (1, 2)}
    link = {i: {k: after[i][k] - before[i][k] for k in ("out", "in")} for i in (1, 2)}
    return {"model": model, "rate": rate_name(rate), "repeat": repeat,
            **figures(folder, method, MODELS[model]["target"], link)}


# -- tables -----------------------------------------------------------------------------------------

def medians(runs: pd.DataFrame) -> pd.DataFrame:
    """Median over repeats per (model, rate, method); time to target: the median of the repeats
    that reached it, or None when fewer than half did."""
    def agg(g: pd.DataFrame) -> pd.Series:
        reached = g["to_target_s"].dropna()
        row = g[["samples_per_s", "wall_s", "steps", "steps_per_s", "test_acc", "teacher_age",
                 "link_bytes"]].astype(float).median().to_dict()
        steps_needed = g["to_target_step"].dropna()
        row.update(to_target_s=reached.median() if len(reached) * 2 > len(g) else None,
                   to_target_step=steps_needed.median() if len(steps_needed) else None,
                   reached=f"{len(reached)}/{len(g)}", repeats=len(g), warm_only=bool(g["warm_only"].any()))
        return pd.Series(row, dtype=object)
    return runs.groupby(["model", "rate", "method"], sort=False).apply(agg, include_groups=False).reset_index()


def report_table(med: pd.DataFrame, model: str, budget_s: float) -> str:
    rows = []
    sub = med[med["model"] == model]
    for _, r in sub.iterrows():
        same_link = sub[(sub["rate"] == r["rate"]) & (sub["method"] == "independent")]
        unshaped = sub[(sub["rate"] == "unshaped") & (sub["method"] == r["method"])]
        util = r["samples_per_s"] / same_link["samples_per_s"].iloc[0] if len(same_link) else float("nan")
        keep = r["samples_per_s"] / unshaped["samples_per_s"].iloc[0] if len(unshaped) else float("nan")
        to_target = seconds(r["to_target_s"], missing=f"> budget ({budget_s:g} s)")
        needed = unshaped["to_target_step"].iloc[0] if len(unshaped) else None
        if to_target.startswith(">") and needed is not None and not pd.isna(needed) and r["steps_per_s"] > 0:
            # the steps this method needed unshaped, at the steps/s it ran here: an estimate, marked so
            to_target += f", est. {needed / r['steps_per_s']:,.0f} s"
        link_mbit = r["link_bytes"] * 8 / r["wall_s"] / 1e6
        rows.append([r["rate"], r["method"], f"{r['samples_per_s']:,.0f}" + ("*" if r["warm_only"] else ""), f"{util:.2f}", f"{keep:.2f}",
                     f"{r['steps']:.0f}", f"{r['steps_per_s']:.1f}", f"{r['wall_s']:.1f}", to_target, r["reached"],
                     f"{100 * r['test_acc']:.1f}",
                     "-" if r["teacher_age"] is None or pd.isna(r["teacher_age"]) else f"{r['teacher_age']:.0f}",
                     human_bytes(r["link_bytes"]), f"{link_mbit:.1f}"])
    return markdown_table(["link", "method", "samples/s/worker", "util", "vs unshaped", "steps", "steps/s", "wall s",
                           "to target", "reached", "test %", "teacher age", "bytes/link", "Mbit/s/link"], rows)


def plot(med: pd.DataFrame, measured: dict, budgets: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    models = list(dict.fromkeys(med["model"]))
    fig = Figure(figsize=(5.5 * len(models), 8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(models), squeeze=False)
    for col, model in enumerate(models):
        sub = med[med["model"] == model]
        for method, g in sub.groupby("method", sort=False):
            color = f"C{list(METHODS).index(method)}"  # one colour per method in every panel
            xs = [measured[label] for label in g["rate"]]
            axes[0][col].plot(xs, g["samples_per_s"].astype(float), marker="o", color=color, label=method)
            reached = g["to_target_s"].astype(float)
            axes[1][col].plot(xs, reached.fillna(budgets[model]), marker="o", color=color, label=method)
            over = reached.isna().to_numpy()
            if over.any():  # "> budget": drawn at the budget, hollow
                axes[1][col].plot(np.array(xs)[over], [budgets[model]] * int(over.sum()), marker="o", ls="none",
                                  mfc="white", mec=color, ms=10)
        axes[0][col].set(title=f"{model}: throughput", ylabel="samples/s per worker")
        axes[1][col].set(title=f"{model}: time to target (hollow: > budget)", ylabel="seconds")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("measured link rate, Mbit/s (rightmost: unshaped)")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][col].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


# -- main -------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="unshaped and 10 Mbit/s; logits, allreduce, independent; short runs; 1 repeat")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 3; --quick 1)")
    parser.add_argument("--out", default=None, help="results folder (default: a new temp folder)")
    parser.add_argument("--plot", default=None, help="write the plot here (default: <out>/bandwidth.png)")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the driver, inside n0
    args = parser.parse_args(argv)
    out = temp_root("bandwidth") if args.out is None else Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.serve:
        return serve(out)
    ok, why = available()
    if not ok:
        print(f"bandwidth.py needs an emulated cluster: {why}", file=sys.stderr)
        return 2

    rates, methods = RATES, list(METHODS)
    steps = {m: spec["steps"] for m, spec in MODELS.items()}
    budgets = {m: spec["budget_s"] for m, spec in MODELS.items()}
    repeats = args.repeats or 3
    if args.quick:
        rates, methods, steps, budgets = QUICK["rates"], QUICK["methods"], QUICK["steps"], QUICK["budget_s"]
        repeats = args.repeats or 1
    splits = load_splits(load_config(REPO / "configs/mnist1d.yaml").data)
    params = {m: count_parameters(build_model(load_config(REPO / "configs/mnist1d.yaml").replace(
        **spec["overrides"]).model, splits.input_shape, splits.num_classes)) for m, spec in MODELS.items()}

    clock = Clock()
    print(f"machine: {machine()}")
    print(f"command: {command()}")
    print(f"load average before: {load_average()}")
    print(f"results and logs: {out}")
    for m, spec in MODELS.items():
        print(f"model {m}: {params[m]:,} parameters ({human_bytes(4 * params[m])} of float32 gradients per step), "
              f"{steps[m]} steps or {budgets[m]:g} s per run, target validation accuracy {spec['target']:.0%}")
    total = len(rates) * len(methods) * len(MODELS) * repeats
    print(f"{total} runs: {len(rates)} link rates x {len(methods)} methods x {len(MODELS)} models x {repeats} "
          f"repeat(s), interleaved", flush=True)

    runs, measured = [], {}
    with EmulatedCluster(workers=2, rate_mbit=None, head_cpus=1, worker_cpus=1) as cluster:
        print(cluster.describe(), flush=True)
        driver, ok = Driver(cluster, out), False
        try:
            for repeat in range(repeats):
                for rate in rates:
                    cluster.set_rate(rate)
                    got = cluster.measure_rate(1, 0, seconds=1.5 if rate is None or rate >= 100 else 3.0)
                    measured.setdefault(rate_name(rate), []).append(got)
                    print(f"[{clock}] repeat {repeat + 1}/{repeats}, links {rate_name(rate)}: measured "
                          f"{got:,.1f} Mbit/s n1 -> n0", flush=True)
                    for model in MODELS:
                        for method in methods:
                            row = run_one(cluster, driver, out, model, method, steps[model], budgets[model], rate,
                                          repeat)
                            runs.append(row)
                            print(f"[{clock}]   {model} {method}: {row['samples_per_s']:,.0f} samples/s/worker, "
                                  f"{row['steps']:.0f} steps in {row['wall_s']:.1f} s, to target "
                                  f"{seconds(row['to_target_s'])}, test {100 * row['test_acc']:.1f}%, "
                                  f"{human_bytes(row['link_bytes'])}/link",
                                  flush=True)
            ok = True
        finally:
            driver.close(kill=not ok)
    df = pd.DataFrame(runs)
    write_atomic(out / "runs.csv", lambda tmp: df.to_csv(tmp, index=False))
    med = medians(df)
    rate_of = {label: float(np.median(v)) for label, v in measured.items()}

    print(f"\nload average after: {load_average()}; {len(df)} runs in {clock}")
    print("measured link rates (TCP n1 -> n0 through two shaped links, median over repeats): "
          + ", ".join(f"{label}: {v:,.1f} Mbit/s" for label, v in rate_of.items()))
    for m in MODELS:
        unshaped = df[(df["model"] == m) & (df["rate"] == "unshaped")]
        missed = sorted(set(unshaped.loc[unshaped["to_target_s"].isna(), "method"]))
        print(f"\n### {m}: {params[m]:,} parameters; {steps[m]} steps or {budgets[m]:g} s per run; target "
              f"{MODELS[m]['target']:.0%} validation accuracy ("
              + (f"NOT reached unshaped by: {', '.join(missed)}" if missed else "reached unshaped by every method")
              + f"); medians over {repeats} repeat(s)\n")
        print(report_table(med, m, budgets[m]))
    print("\nutil: samples/s per worker against independent replicas on the same links; vs unshaped: against the "
          "same method unshaped; teacher age: steps between a teacher's making and its use (median over rows); "
          "bytes/link: both ways, per worker node's link, whole run; *: the run never got past step "
          f"{SKIP_STEPS}, so its samples/s include the first steps")
    path = Path(args.plot) if args.plot else out / "bandwidth.png"
    plot(med, rate_of, budgets, path)
    print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
