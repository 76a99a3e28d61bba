"""Teachers on the worker's side: what a replica's worker does with the exchange each step.

- `LogitsTeacher` (`codistill.exchange: logits`): asks the broker ahead for the peers' stored
  logits of coming batches, a chunk of batches per call, and publishes its own;
- `WeightsTeacher` (`codistill.exchange: weights`): loads the peers' newest published weights
  into local eval-mode copies and runs them on its own batch;
- `Lookahead`: the indices of the coming batches, so teachers can be asked for ahead.
"""

from __future__ import annotations

import itertools
from collections import deque

import numpy as np
import ray
import torch
import torch.nn.functional as F

from ray_codistill.client import BrokerClient
from ray_codistill.errors import NonFiniteError
from ray_codistill.store import draw_peer

PREFETCH_LEAD_STEPS = 4  # logits mode: steps between asking for a chunk of teachers and using it


def state_bytes(state: dict) -> int:
    """Bytes of a state dict's tensors, each storage once (a GPT's tied embedding is one matrix
    under two names, and travels once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state.values()}
    return sum(storages.values())


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
    With `topk`, only each sample's (a language model: each token's) k largest logits and their
    classes are published. With
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
            logits /= logits.sum(-1, keepdim=True).clamp_min(torch.finfo(logits.dtype).tiny)
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
            dtype = torch.int16 if logits.shape[-1] <= torch.iinfo(torch.int16).max else torch.int32
            logits, classes = logits.topk(self.topk, dim=-1)
            classes = classes.to("cpu", dtype).numpy()
        logits = logits.to("cpu", torch.float16).numpy()
        if not np.isfinite(logits).all():  # already on the CPU: this check costs no device sync
            raise NonFiniteError(f"replica {self.client.replica}: non-finite logits at steps "
                                 f"{steps[0]}-{steps[-1]}; not published, restarting from the last checkpoint")
        self.client.publish(steps, torch.cat([i for _, i, _ in self.outbox]).numpy(), logits, classes)
        self.outbox = []


def forward_teacher(models: list, x: torch.Tensor, rule: str, temperature: float) -> torch.Tensor:
    """The teacher of a batch from models held locally (peers' copies, or a finished model): their
    logits, their mean, or under `mean_probs` the mean of softmax(z / temperature), which the loss
    then takes as probabilities."""
    with torch.no_grad():
        outputs = [m(x) for m in models]
        if rule == "mean_probs":
            outputs = [F.softmax(z / temperature, dim=-1) for z in outputs]
        return outputs[0] if len(outputs) == 1 else torch.stack(outputs).mean(0)  # one model: no copy


class WeightsTeacher:
    """Local eval-mode copies of the peers' latest published weights, run on our own batch;
    `model_fn(peer)` builds a peer's own architecture (replicas may differ: `replica_overrides`).

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
        self.step = 0  # our newest step: peers' teacher ages are counted from it (`Broker.get_weights`)
        self.tally = self._new_tally()

    def _load(self, answer: dict, my_step: int) -> None:
        for peer, (step, peer_latest, ref) in answer.items():
            self.lead[peer] = peer_latest - my_step
            if peer in self.peers and self.peers[peer][1] >= step:
                continue
            try:
                state = ray.get(ref[0], timeout=max(self.client.timeout_s, 10.0))
            except Exception:  # the owner of the object died: keep the teacher we have
                continue
            model = self.peers[peer][0] if peer in self.peers else self.model_fn(peer).to(self.device).eval()
            model.load_state_dict(state)
            model.requires_grad_(False)
            self.peers[peer] = (model, step)
            self.tally["bytes"] += state_bytes(state)

    def teacher(self, x: torch.Tensor, step: int, device: torch.device, upcoming: Lookahead):
        self.step = step
        if self.pending is not None and ray.wait([self.pending], timeout=0)[0]:
            answer, self.pending = self.client.resolve(self.pending), None
            self._load(answer or {}, step)
        # poll every `every` steps; before the first teacher arrives, ten times as often (not every
        # step: that was an actor call per step on the training path for nothing)
        poll_every = self.every if self.peers else max(1, self.every // 10)
        if self.pending is None and step % poll_every == 0:
            self.pending = self.client.get_weights_async()
        if not self.peers:
            self.tally["misses"] += x.shape[0]
            return None
        peers = sorted(self.peers)
        if self.rule == "random_peer":
            peers = [draw_peer(self.seed, self.client.replica, step, peers)]
        ages = [max(0, step + self.lead.get(p, 0) - self.peers[p][1]) for p in peers]
        self.tally["hits"] += x.shape[0]
        self.tally["ages"].append(int(np.mean(ages)))
        for p, a in zip(peers, ages):
            acc = self.tally["peer_ages"].setdefault(p, [0, 0])
            acc[0], acc[1] = acc[0] + a, acc[1] + 1
        teacher = forward_teacher([self.peers[p][0] for p in peers], x, self.rule, self.temperature)
        return teacher, None, np.asarray(ages)  # every sample has a teacher: no mask

    def flush(self) -> None:
        """Send the teacher counters kept since the last flush (the broker cannot see them), and
        our step."""
        t = self.tally
        if t["hits"] or t["misses"] or t["bytes"]:
            self.client.record_teacher(self.step, t["hits"], t["misses"], np.asarray(t["ages"], np.int64), t["bytes"],
                                       t["peer_ages"])
        self.tally = self._new_tally()

    @staticmethod
    def _new_tally() -> dict:
        return {"hits": 0, "misses": 0, "ages": [], "bytes": 0, "peer_ages": {}}

    def publish_weights(self, step: int, model: torch.nn.Module) -> None:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
            raise NonFiniteError(f"replica {self.client.replica}: non-finite weights at step {step}; "
                                 f"not published, restarting from the last checkpoint")
        nbytes = state_bytes(state)
        self.client.put_weights(step, [ray.put(state)], nbytes)

    def publish(self, step: int, idx: torch.Tensor, logits: torch.Tensor) -> None:
        pass  # weights mode publishes state dicts, see publish_weights
