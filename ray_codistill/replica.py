"""The training loop of one Ray Train worker, read top to bottom.

Each worker of a replica's worker group runs `train_loop_per_worker`. Per step it goes:
fetch teachers -> forward -> loss -> step -> publish -> evaluate -> report. Replicas meet only
through the broker (teacher material) and record the run in the ledger (registration, metric rows,
probe logits, the final result); inside a replica, DDP synchronises gradients.
"""

from __future__ import annotations

import math
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F

from ray_codistill.client import BrokerClient, LedgerClient
from ray_codistill.config import ExperimentConfig
from ray_codistill.errors import NonFiniteError
from ray_codistill.data import eval_batches, probe_split, train_batches, train_indices
from ray_codistill.loss import alpha_at, codistill_loss
from ray_codistill.models import build_model, count_parameters, describe_model
from ray_codistill.offline import FixedTeacher
from ray_codistill.optim import build_optimizer
from ray_codistill.tasks import lm_figures, task_of
from ray_codistill.teachers import Lookahead, LogitsTeacher, WeightsTeacher


FINISH_TIMEOUT_S = 300.0
LEDGER_TIMEOUT_S = 10.0  # the rendezvous and the stop flag: answers nothing in a step waits for


def replica_seed(seed: int, replica: int) -> int:
    """Each replica has its own init and data order; seeds never collide across experiments."""
    return seed * 1000 + replica


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class AllreduceCounter:
    """A DDP comm hook that counts the bytes of the gradient buckets it all-reduces."""

    def __init__(self) -> None:
        self.bytes = 0

    def hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
        self.bytes += bucket.buffer().numel() * bucket.buffer().element_size()
        return allreduce_hook(state, bucket)


@torch.no_grad()
def predict(model: torch.nn.Module, ds, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels of a whole split, in order, on the CPU (eval mode, restored after)."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for x, y, _ in eval_batches(ds, batch_size):
        logits.append(model(x.to(device)).float().cpu())
        labels.append(y)
    model.train(was_training)
    return torch.cat(logits), torch.cat(labels)


def evaluate(model: torch.nn.Module, ds, batch_size: int, device: torch.device, want_probs: bool = False):
    """Accuracy and mean cross-entropy over a whole split, per sample for classifiers and per
    token for language models (and the softmax outputs when asked: float16 for text, whose
    outputs are a row per token). One batch at a time: a split's logits are never all held."""
    was_training = model.training
    model.eval()
    loss, correct, count, probs, labels = 0.0, 0, 0, [], []  # sums stay on the device: one sync at the end
    with torch.no_grad():
        for x, y, _ in eval_batches(ds, batch_size):
            z, y = model(x.to(device)).float(), y.to(device)
            rows, targets = z.flatten(0, -2), y.flatten()  # a language model's tokens as rows
            loss += F.cross_entropy(rows, targets, reduction="sum")
            correct += (rows.argmax(-1) == targets).sum()
            count += targets.numel()
            if want_probs:
                p = z.softmax(-1).cpu()
                probs.append(p.half() if z.dim() == 3 else p)
                labels.append(y.cpu())
    model.train(was_training)
    out = {"acc": float(correct) / count, "loss": float(loss) / count}
    if want_probs:
        out["probs"], out["labels"] = torch.cat(probs).numpy(), torch.cat(labels).numpy()
    return out


def _save_checkpoint(step: int, model, optimizer, scheduler, metrics: dict, rank: int) -> None:
    """Report metrics with a checkpoint (rank 0 writes it; every rank must call report)."""
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            torch.save({"step": step, "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state()},
                       Path(tmp) / "state.pt")
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def _restore(model, optimizer, scheduler) -> int:
    """Resume from the worker group's latest checkpoint, if Ray Train restarted us with one."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as path:
        state = torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return int(state["step"])


def _wait_for_peers(ledger: LedgerClient, replicas: int, timeout_s: float) -> None:
    """Start together: worker groups come up seconds apart, and a replica that starts alone
    trains its first steps with no teacher. Bounded, so a replica that never comes is no hang."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        up = ledger.replicas_up()
        if up is not None and up >= replicas:
            return
        # a short poll: a coarse one would let one replica start alone; back off if the broker fails
        time.sleep(0.01 if up is not None else 1.0)


class StopRequest:
    """Whether a user asked the ledger to stop the experiment (`ray-codistill stop`), asked at each
    metric row and answered by the next one, so no step waits for it. Every rank of a worker group
    must stop at the same step (DDP would hang otherwise): rank 0 asks, the group agrees."""

    def __init__(self, ledger: LedgerClient, rank: int, world: int, device: torch.device) -> None:
        self.ledger, self.rank, self.world, self.device = ledger, rank, world, device
        self.pending = None

    def requested(self) -> bool:
        asked = False
        if self.rank == 0:
            asked = self.pending is not None and self.ledger.resolve(self.pending) is True
            self.pending = self.ledger.stop_requested_async()
        if self.world > 1:
            flag = torch.tensor([int(asked)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            asked = bool(flag.item())
        return asked


class Budget:
    """`time_budget_s`: whether the worker group's wall-clock budget is spent, asked at every step
    (a step of all-reduce over a slow link can take seconds: metric rows would be too coarse).
    Rank 0's clock decides; in a group of several ranks its verdict travels in a one-element
    all-reduce started at one step and read at the next, so every rank stops at the same step and
    no step waits for the round trip."""

    def __init__(self, budget_s: float, rank: int, world: int, device: torch.device) -> None:
        self.budget_s, self.rank, self.world, self.device = budget_s, rank, world, device
        self.started = time.perf_counter()
        self.flag, self.work = None, None

    def spent(self) -> bool:
        mine = self.rank == 0 and time.perf_counter() - self.started >= self.budget_s
        if self.world == 1:
            return mine
        if self.work is not None:
            self.work.wait()
            if self.flag.item():
                self.work = None
                return True
        self.flag = torch.tensor([int(mine)], device=self.device)
        self.work = torch.distributed.all_reduce(self.flag, op=torch.distributed.ReduceOp.MAX, async_op=True)
        return False

    def close(self) -> None:
        if self.work is not None:  # every rank started it: let it complete before what follows
            self.work.wait()


def train_loop_per_worker(loop_config: dict) -> None:
    shared = ExperimentConfig.from_dict(loop_config["config"])
    replica: int = loop_config["replica"]
    cfg = shared.for_replica(replica)  # this replica's own model, optimizer and alpha (replica_overrides)
    splits = ray.get(loop_config["splits"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    seed = replica_seed(cfg.seed, replica)
    lm = task_of(cfg).is_lm  # a language model: figures per token, and bits per character

    # -- model, optimizer, data ------------------------------------------------------------------
    torch.manual_seed(seed)  # the same init on every rank of a replica, another per replica
    def model_fn(of: int = replica) -> torch.nn.Module:  # a peer's own architecture, for its weights
        return build_model(shared.for_replica(of).model, splits.input_shape, splits.num_classes)

    model = ray.train.torch.prepare_model(model_fn())
    counter = AllreduceCounter()
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model.register_comm_hook(None, counter.hook)
    optimizer, scheduler = build_optimizer(cfg.optim, model, cfg.steps)
    start = _restore(model, optimizer, scheduler)
    batches = train_batches(splits.train, cfg.batch_size, seed, rank, world, start_step=start,
                            num_workers=cfg.data.num_workers)
    # the sample indices of the coming batches, for asking the broker ahead; indices only: looking
    # ahead at the batches themselves would hold a chunk of (image) batches in memory
    upcoming = Lookahead(train_indices(splits.train, cfg.batch_size, seed, rank, world, start_step=start))

    client = BrokerClient(cfg.name, replica, cfg.codistill.fetch_timeout_s, loop_config["token"], rank,
                          cfg.codistill.broker_shards)
    ledger = LedgerClient(cfg.name, replica, LEDGER_TIMEOUT_S, loop_config["token"], rank)
    client.register(start)
    ledger.register_worker({"pid": os.getpid(), "host": socket.gethostname(),
                            "node_id": ray.get_runtime_context().get_node_id(),
                            "node_ip": ray.util.get_node_ip_address(), "device": str(device),
                            "model": describe_model(cfg.model), "params": count_parameters(unwrap(model))}, start)
    cc = cfg.codistill
    probs = cc.teacher_rule == "mean_probs"  # the teacher is a distribution, not logits
    exchange = None
    if shared.method == "distill":  # offline: a finished model teaches, nothing is exchanged
        exchange = FixedTeacher(cfg, splits, device)
    elif shared.exchanges:  # a replica whose own alpha is 0 still publishes for the others
        _wait_for_peers(ledger, cfg.num_models, cc.wait_for_peers_s)
        exchange = (LogitsTeacher(client, cc.exchange_batches, device, cc.topk, probs=probs)
                    if cc.exchange == "logits" else
                    WeightsTeacher(client, model_fn, cc.exchange_every, device, cc.teacher_rule, cc.temperature,
                                   cfg.seed))
    probe = probe_split(splits, cc.probe_size) if rank == 0 and cfg.num_models > 1 and cc.probe_every else None
    alpha_of = (lambda s: alpha_at(s, cc.alpha, cc.burn_in, cc.ramp_steps)) if exchange is not None else (lambda s: 0.0)

    # -- loop ------------------------------------------------------------------------------------
    def new_window() -> dict:
        # losses stay tensors until a row is written: a .item() per step would sync a GPU every step
        return {"loss": 0.0, "ce": 0.0, "distill": 0.0, "hits": 0, "ages": [], "seen": 0, "tokens": 0, "n": 0,
                "time": 0.0}

    win, started, last_val = new_window(), time.perf_counter(), None
    stop, stopped, done = StopRequest(ledger, rank, world, device), None, start
    budget = Budget(cfg.time_budget_s, rank, world, device) if cfg.time_budget_s else None
    model.train()
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        x, y, idx = next(batches)
        next(upcoming)  # in step with the batches: it shows the indices of steps after this one
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        alpha = alpha_of(step)
        teacher = exchange.teacher(x, step, device, upcoming) if exchange is not None and alpha > 0 else None

        logits = model(x)
        loss, ce, distill = codistill_loss(logits, y, teacher and teacher[0], teacher and teacher[1],
                                           alpha, cc.distance, cc.temperature, probs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

        if exchange is not None:
            exchange.publish(step, idx, logits)
            if rank == 0 and isinstance(exchange, WeightsTeacher) and (step + 1) % cc.exchange_every == 0:
                exchange.publish_weights(step + 1, unwrap(model))
        win["time"] += time.perf_counter() - t0

        win["n"] += 1
        win["seen"] += len(y)  # samples: a language model's windows
        win["tokens"] += y.numel()
        win["loss"] += loss.detach()
        win["ce"] += ce.detach()
        win["distill"] += distill.detach()
        if teacher is not None:
            win["hits"] += len(y) if teacher[1] is None else teacher[1].sum()
            win["ages"].append(np.asarray(teacher[2]))

        done = step + 1
        out_of_time = budget is not None and done < cfg.steps and budget.spent()
        is_eval = done % cfg.eval_every == 0 or done == cfg.steps or out_of_time
        if done % cfg.log_every == 0 or is_eval:
            if isinstance(exchange, WeightsTeacher):
                exchange.flush()  # its teacher counters; logits go out only in whole chunks
            if not math.isfinite(float(win["loss"])):  # one device sync per log row, not per step
                raise NonFiniteError(f"replica {replica}: non-finite loss in steps {done - win['n']}-{done}; "
                                     f"restarting from the last checkpoint")
            if rank == 0:
                ages = np.concatenate(win["ages"]) if win["ages"] else np.zeros(0)
                n = win["n"]
                row = {"step": done, "train/loss": float(win["loss"]) / n, "train/ce": float(win["ce"]) / n,
                       "train/distill": float(win["distill"]) / n, "distill/alpha": alpha,
                       "distill/hit_rate": float(win["hits"]) / win["seen"] if exchange is not None else None,
                       "distill/teacher_age": float(ages.mean()) if ages.size else None,
                       # evaluation time stays out of throughput
                       "perf/samples_per_s": win["seen"] * world / win["time"],
                       **({"perf/tokens_per_s": win["tokens"] * world / win["time"]} if lm else {}),
                       "comm/allreduce_bytes": counter.bytes * world,
                       "lr": scheduler.get_last_lr()[0], "time_s": time.perf_counter() - started,
                       "timestamp": time.time()}  # wall clock: time_s restarts with the worker
                if is_eval:
                    last_val = evaluate(unwrap(model), splits.val, cfg.eval_batch_size, device)
                    row["val/acc"], row["val/loss"] = last_val["acc"], last_val["loss"]
                    if lm:
                        row.update(lm_figures(last_val["loss"], "val/"))
                ledger.log([row])
            win = new_window()
            stopped = "budget" if out_of_time else "request" if done < cfg.steps and stop.requested() else None
            if stopped is not None:
                last_val = last_val if is_eval else None
                break
        if probe is not None and (done % cc.probe_every == 0 or done == cfg.steps):
            ledger.probe(done, predict(unwrap(model), probe, cfg.eval_batch_size, device)[0].numpy())
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done != cfg.steps:
            _save_checkpoint(done, model, optimizer, scheduler, {"step": done}, rank)

    if budget is not None:
        budget.close()
    if exchange is not None:
        exchange.flush()

    # -- final figures: validation for selection, test for the record ------------------------------
    result = {"replica": replica, "model": describe_model(cfg.model), "params": count_parameters(unwrap(model)),
              "steps": done, **({"stopped": True} if stopped == "request" else {}),
              **({"budget_reached": True} if stopped == "budget" else {})}
    if rank == 0:
        fresh = last_val is not None and start < done
        val = last_val if fresh else evaluate(unwrap(model), splits.val, cfg.eval_batch_size, device)
        test = evaluate(unwrap(model), splits.test, cfg.eval_batch_size, device, want_probs=True)
        result.update(val_acc=val["acc"], val_loss=val["loss"], test_acc=test["acc"], test_loss=test["loss"],
                      allreduce_bytes=counter.bytes * world, **client.fetch_latency())
        if lm:
            result.update(**lm_figures(val["loss"], "val_"), **lm_figures(test["loss"], "test_"))
        # waits through a ledger restart: the result must reach the driver
        if not ledger.finish(result, test["probs"], test["labels"], timeout_s=FINISH_TIMEOUT_S):
            raise RuntimeError(f"replica {replica}: the ledger did not take the final result")
    _save_checkpoint(done, model, optimizer, scheduler, {"step": done, **result}, rank)
