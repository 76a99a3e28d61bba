"""The training loop of one Ray Train worker, read top to bottom.

Each worker of a replica's worker group runs `train_loop_per_worker`. Per step it goes:
fetch teachers -> forward -> loss -> step -> publish -> evaluate -> report. Replicas meet only
through the broker (teacher material, metric rows); inside a replica, DDP synchronises gradients.
"""

from __future__ import annotations

import itertools
import math
import os
import socket
import tempfile
import time
from collections import deque
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F

from ray_codistill.broker import BrokerClient
from ray_codistill.config import ExperimentConfig
from ray_codistill.errors import NonFiniteError
from ray_codistill.data import eval_batches, probe_split, train_batches, train_indices
from ray_codistill.loss import alpha_at, codistill_loss
from ray_codistill.models import build_model
from ray_codistill.optim import build_optimizer
from ray_codistill.store import draw_peer


FINISH_TIMEOUT_S = 300.0
PREFETCH_LEAD_STEPS = 4  # logits mode: steps between asking for a chunk of teachers and using it


def replica_seed(seed: int, replica: int) -> int:
    """Each replica has its own init and data order; seeds never collide across experiments."""
    return seed * 1000 + replica


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class Lookahead:
    """An iterator that can show its next items without consuming them."""

    def __init__(self, it) -> None:
        self.it, self.buffer = it, deque()

    def __iter__(self):
        return self

    def __next__(self):
        return self.buffer.popleft() if self.buffer else next(self.it)

    def peek(self, n: int) -> list:
        while len(self.buffer) < n:
            self.buffer.append(next(self.it))
        return list(itertools.islice(self.buffer, n))


class LogitsTeacher:
    """Peers' stored logits for our batches, `chunk` batches per broker call, asked ahead.

    The teachers of the next `chunk` steps are asked for `lead` steps before the first of them
    trains, so a step seldom waits on the broker (at most `fetch_timeout_s`, when the answer is
    late); our own logits are sent `chunk` batches at a time, fire-and-forget.
    What this costs a step is measured by benchmarks/overhead.py; what it is made of:
    - a Ray actor call costs about a millisecond of CPU on both sides (the worker's submission,
      the broker's execution), and on a machine without spare cores the broker's share is taken
      from the workers: fewer, larger calls (`chunk`) keep it off the training step;
    - per chunk, not per step: one float16 -> float32 conversion and copy of the answer (Ray's
      arrays are read-only), one copy of our logits to float16 on the CPU (one device sync);
      per step only views of those;
    - a batch whose samples all have a teacher goes without a mask (boolean indexing and its
      backward cost more than the distillation term itself on a small model).
    With `topk`, only each sample's k largest logits and their classes are published. With
    `probs` (the `mean_probs` rule) the broker answers with probabilities, which are scaled back
    to a sum of 1 once per chunk (float16 leaves them up to about 1e-3 off).
    """

    def __init__(self, client: BrokerClient, chunk: int, device: torch.device, topk: int | None = None,
                 lead: int | None = None, probs: bool = False) -> None:
        self.client, self.chunk, self.device, self.topk, self.probs = client, chunk, device, topk, probs
        # steps between asking for a chunk and its first step: long enough for a broker round
        # trip, short because every step of lead adds a step of staleness to the chunk's teachers
        self.lead = min(chunk, PREFETCH_LEAD_STEPS) if lead is None else lead
        self.cache: dict[int, tuple] = {}  # step -> (logits, mask or None, ages of the hits)
        self.pending = None  # (first step, batch sizes, ref) of the chunk in flight
        self.next_step: int | None = None  # first step whose teachers were not asked for yet
        self.outbox: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (step, idx, logits)

    def _receive(self) -> None:
        first, sizes, ref = self.pending
        self.pending = None
        answer = self.client.resolve(ref)
        if answer is None or answer[0] is None:
            return  # broker late or gone, or no peer has published yet: these steps go without
        logits, mask, age = answer
        logits = torch.from_numpy(logits.astype(np.float32)).to(self.device)  # astype copies: writable
        if self.probs:  # rows without a teacher are all 0 and stay so
            logits /= logits.sum(1, keepdim=True).clamp_min(torch.finfo(logits.dtype).tiny)
        bounds = np.cumsum([0, *sizes])
        for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
            m = mask[lo:hi]
            if m.all():
                self.cache[first + i] = (logits[lo:hi], None, age[lo:hi])
            elif m.any():
                self.cache[first + i] = (logits[lo:hi], torch.from_numpy(m.copy()).to(self.device), age[lo:hi][m])
            # no teacher for any sample of the batch: the step trains on labels alone

    def _request(self, step: int, upcoming: Lookahead) -> None:
        offset = self.next_step - (step + 1)  # `upcoming` starts at step + 1
        idx = [b.numpy() for b in upcoming.peek(offset + self.chunk)[offset:]]
        self.pending = (self.next_step, [len(i) for i in idx],
                        self.client.fetch_async(np.concatenate(idx), self.next_step))
        self.next_step += self.chunk

    def teacher(self, x: torch.Tensor, step: int, device: torch.device, upcoming: Lookahead):
        if self.pending is not None and self.pending[0] <= step:
            self._receive()  # due now: waits for the answer, at most fetch_timeout_s
        if self.next_step is None or self.next_step <= step:
            # first call, or we fell behind (a late or empty answer): ask from the next step on;
            # requests are paced by `lead`, so missed chunks never push them further ahead
            self.next_step = step + 1
        if self.pending is None and self.next_step <= step + self.lead:
            self._request(step, upcoming)
        for old in [s for s in self.cache if s < step]:
            del self.cache[old]
        return self.cache.pop(step, None)

    def publish(self, step: int, idx: torch.Tensor, logits: torch.Tensor) -> None:
        self.outbox.append((step, idx, logits.detach()))
        if len(self.outbox) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if not self.outbox:
            return
        steps = np.repeat([s for s, _, _ in self.outbox], [len(i) for _, i, _ in self.outbox])
        logits = torch.cat([z for _, _, z in self.outbox])
        classes = None
        if self.topk is not None:  # only the k largest logits and their classes leave the worker
            dtype = torch.int16 if logits.shape[1] <= torch.iinfo(torch.int16).max else torch.int32
            logits, classes = logits.topk(self.topk, dim=1)
            classes = classes.to("cpu", dtype).numpy()
        logits = logits.to("cpu", torch.float16).numpy()
        if not np.isfinite(logits).all():  # already on the CPU: this check costs no device sync
            raise NonFiniteError(f"replica {self.client.replica}: non-finite logits at steps "
                                 f"{steps[0]}-{steps[-1]}; not published, restarting from the last checkpoint")
        self.client.publish(steps, torch.cat([i for _, i, _ in self.outbox]).numpy(), logits, classes)
        self.outbox = []


class WeightsTeacher:
    """Local eval-mode copies of the peers' latest published weights, run on our own batch.

    Every `every` steps we ask the broker for the peers' newest state dicts and load them as soon
    as the answer arrives (never waiting for it); until then the older teacher serves.
    `rule` (`codistill.teacher_rule`) makes one teacher of the loaded peers, as the broker does in
    logits mode: the mean of their logits, the mean of their softmax(z / `temperature`) (then the
    teacher is probabilities), or one peer per step drawn from `seed`, our replica and the step
    among the loaded peers (`store.draw_peer`), whose forward pass alone is run: one extra pass
    per step whatever R.
    """

    def __init__(self, client: BrokerClient, model_fn, every: int, device: torch.device,
                 rule: str = "mean_logits", temperature: float = 1.0, seed: int = 0) -> None:
        self.client, self.model_fn, self.every, self.device = client, model_fn, every, device
        self.rule, self.temperature, self.seed = rule, temperature, seed
        self.peers: dict[int, tuple[torch.nn.Module, int]] = {}  # peer -> (model, weights step)
        # peer -> how many steps the peer was ahead of us when the broker last answered; a teacher's
        # age in the peer's own steps is then (our step + lead) - the step of its weights
        self.lead: dict[int, int] = {}
        self.pending = None
        self.tally = {"hits": 0, "misses": 0, "ages": [], "bytes": 0}

    def _load(self, answer: dict, my_step: int) -> None:
        for peer, (step, peer_latest, ref) in answer.items():
            self.lead[peer] = peer_latest - my_step
            if peer in self.peers and self.peers[peer][1] >= step:
                continue
            try:
                state = ray.get(ref[0], timeout=max(self.client.timeout_s, 10.0))
            except Exception:  # the owner of the object died: keep the teacher we have
                continue
            model = self.peers[peer][0] if peer in self.peers else self.model_fn().to(self.device).eval()
            model.load_state_dict(state)
            model.requires_grad_(False)
            self.peers[peer] = (model, step)
            self.tally["bytes"] += sum(t.numel() * t.element_size() for t in state.values())

    def teacher(self, x: torch.Tensor, step: int, device: torch.device, upcoming: Lookahead):
        if self.pending is not None and ray.wait([self.pending], timeout=0)[0]:
            answer, self.pending = self.client.resolve(self.pending), None
            self._load(answer or {}, step)
        # poll every `every` steps; before the first teacher arrives, ten times as often (not every
        # step: that was an actor call per step on the training path for nothing)
        poll_every = self.every if self.peers else max(1, self.every // 10)
        if self.pending is None and step % poll_every == 0:
            self.pending = self.client.fetch_weights_async()
        if not self.peers:
            self.tally["misses"] += x.shape[0]
            return None
        peers = sorted(self.peers)
        if self.rule == "random_peer":
            peers = [draw_peer(self.seed, self.client.replica, step, peers)]
        ages = [max(0, step + self.lead.get(p, 0) - self.peers[p][1]) for p in peers]
        self.tally["hits"] += x.shape[0]
        self.tally["ages"].append(int(np.mean(ages)))
        with torch.no_grad():
            outputs = [self.peers[p][0](x) for p in peers]
            if self.rule == "mean_probs":
                outputs = [F.softmax(z / self.temperature, dim=-1) for z in outputs]
            teacher = outputs[0] if len(outputs) == 1 else torch.stack(outputs).mean(0)  # one peer: no copy
        return teacher, None, np.asarray(ages)  # every sample has a teacher: no mask

    def flush(self) -> None:
        """Send the teacher counters kept since the last flush (the broker cannot see them)."""
        t = self.tally
        if t["hits"] or t["misses"] or t["bytes"]:
            self.client.send("record_teacher", t["hits"], t["misses"], np.asarray(t["ages"], np.int64), t["bytes"])
        self.tally = {"hits": 0, "misses": 0, "ages": [], "bytes": 0}

    def publish_weights(self, step: int, model: torch.nn.Module) -> None:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
            raise NonFiniteError(f"replica {self.client.replica}: non-finite weights at step {step}; "
                                 f"not published, restarting from the last checkpoint")
        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        self.client.send("put_weights", step, [ray.put(state)], nbytes)

    def publish(self, step: int, idx: torch.Tensor, logits: torch.Tensor) -> None:
        pass  # weights mode publishes state dicts, see publish_weights


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
    """Accuracy and mean loss over a whole split (and the softmax outputs when asked)."""
    logits, labels = predict(model, ds, batch_size, device)
    out = {"acc": (logits.argmax(1) == labels).float().mean().item(),
           "loss": F.cross_entropy(logits, labels).item()}
    if want_probs:
        out["probs"], out["labels"] = logits.softmax(1).numpy(), labels.numpy()
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


def _wait_for_peers(client: BrokerClient, replicas: int, timeout_s: float) -> None:
    """Start together: worker groups come up seconds apart, and a replica that starts alone
    trains its first steps with no teacher. Bounded, so a replica that never comes is no hang."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        up = client.call("replicas_up")
        if up is not None and up >= replicas:
            return
        # a short poll: a coarse one would let one replica start alone; back off if the broker fails
        time.sleep(0.01 if up is not None else 1.0)


class StopRequest:
    """Whether a user asked the broker to stop the experiment (`ray-codistill stop`), asked at each
    metric row and answered by the next one, so no step waits for it. Every rank of a worker group
    must stop at the same step (DDP would hang otherwise): rank 0 asks, the group agrees."""

    def __init__(self, client: BrokerClient, rank: int, world: int, device: torch.device) -> None:
        self.client, self.rank, self.world, self.device = client, rank, world, device
        self.pending = None

    def requested(self) -> bool:
        asked = False
        if self.rank == 0:
            asked = self.pending is not None and self.client.resolve(self.pending) is True
            self.pending = self.client.call_async("stop_requested")
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
    cfg = ExperimentConfig.from_dict(loop_config["config"])
    replica: int = loop_config["replica"]
    splits = ray.get(loop_config["splits"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    seed = replica_seed(cfg.seed, replica)

    # -- model, optimizer, data ------------------------------------------------------------------
    torch.manual_seed(seed)  # the same init on every rank of a replica, another per replica
    model_fn = lambda: build_model(cfg.model, splits.input_shape, splits.num_classes)  # noqa: E731
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
    client.send("register_worker", rank, {"pid": os.getpid(), "host": socket.gethostname(),
                                          "node_id": ray.get_runtime_context().get_node_id(),
                                          "node_ip": ray.util.get_node_ip_address(),
                                          "device": str(device)}, start)
    cc = cfg.codistill
    probs = cc.teacher_rule == "mean_probs"  # the teacher is a distribution, not logits
    exchange = None
    if cfg.distills:
        _wait_for_peers(client, cfg.num_models, cc.wait_for_peers_s)
        exchange = (LogitsTeacher(client, cc.exchange_batches, device, cc.topk, probs=probs)
                    if cc.exchange == "logits" else
                    WeightsTeacher(client, model_fn, cc.exchange_every, device, cc.teacher_rule, cc.temperature,
                                   cfg.seed))
    probe = probe_split(splits, cc.probe_size) if rank == 0 and cfg.num_models > 1 and cc.probe_every else None
    alpha_of = (lambda s: alpha_at(s, cc.alpha, cc.burn_in, cc.ramp_steps)) if cfg.distills else (lambda s: 0.0)

    # -- loop ------------------------------------------------------------------------------------
    def new_window() -> dict:
        # losses stay tensors until a row is written: a .item() per step would sync a GPU every step
        return {"loss": 0.0, "ce": 0.0, "distill": 0.0, "hits": 0, "ages": [], "seen": 0, "n": 0, "time": 0.0}

    win, started, last_val = new_window(), time.perf_counter(), None
    stop, stopped, done = StopRequest(client, rank, world, device), None, start
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
        win["seen"] += y.numel()
        win["loss"] += loss.detach()
        win["ce"] += ce.detach()
        win["distill"] += distill.detach()
        if teacher is not None:
            win["hits"] += y.numel() if teacher[1] is None else teacher[1].sum()
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
                       "comm/allreduce_bytes": counter.bytes * world,
                       "lr": scheduler.get_last_lr()[0], "time_s": time.perf_counter() - started,
                       "timestamp": time.time()}  # wall clock: time_s restarts with the worker
                if is_eval:
                    last_val = evaluate(unwrap(model), splits.val, cfg.eval_batch_size, device)
                    row["val/acc"], row["val/loss"] = last_val["acc"], last_val["loss"]
                client.send("log", [row])
            win = new_window()
            stopped = "budget" if out_of_time else "request" if done < cfg.steps and stop.requested() else None
            if stopped is not None:
                last_val = last_val if is_eval else None
                break
        if probe is not None and (done % cc.probe_every == 0 or done == cfg.steps):
            client.send("probe", done, predict(unwrap(model), probe, cfg.eval_batch_size, device)[0].numpy())
        if cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and done != cfg.steps:
            _save_checkpoint(done, model, optimizer, scheduler, {"step": done}, rank)

    if budget is not None:
        budget.close()
    if exchange is not None:
        exchange.flush()

    # -- final figures: validation for selection, test for the record ------------------------------
    result = {"replica": replica, "steps": done, **({"stopped": True} if stopped == "request" else {}),
              **({"budget_reached": True} if stopped == "budget" else {})}
    if rank == 0:
        fresh = last_val is not None and start < done
        val = last_val if fresh else evaluate(unwrap(model), splits.val, cfg.eval_batch_size, device)
        test = evaluate(unwrap(model), splits.test, cfg.eval_batch_size, device, want_probs=True)
        result.update(val_acc=val["acc"], val_loss=val["loss"], test_acc=test["acc"], test_loss=test["loss"],
                      allreduce_bytes=counter.bytes * world, **client.fetch_latency())
        # waits through a broker restart: the result must reach the driver
        if not client.call("finish", result, test["probs"], test["labels"], timeout_s=FINISH_TIMEOUT_S):
            raise RuntimeError(f"replica {replica}: the broker did not take the final result")
    _save_checkpoint(done, model, optimizer, scheduler, {"step": done, **result}, rank)
