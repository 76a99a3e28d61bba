"""LogitsTeacher and WeightsTeacher without Ray: each step gets the teachers of its own batch,
asked ahead in chunks; the weights mode applies the teacher rule to the loaded peers."""

from __future__ import annotations

import numpy as np
import torch

from ray_codistill.data import InMemoryDataset, train_batches, train_indices
from ray_codistill.teachers import Lookahead, LogitsTeacher, WeightsTeacher
from ray_codistill.store import draw_peer

CPU = torch.device("cpu")


class FakeClient:
    """Answers a fetch at once, from the indices alone: teacher logits (index, -index), a mask
    (no teacher for multiples of 5) and an age (index % 7)."""

    replica = 0

    def __init__(self) -> None:
        self.fetches: list[np.ndarray] = []
        self.fetch_steps: list[int] = []
        self.published: list[tuple] = []

    def fetch_async(self, indices: np.ndarray, step: int):
        self.fetches.append(indices.copy())
        self.fetch_steps.append(step)
        return indices.copy()

    def resolve(self, ref):
        answer = (np.stack([ref, -ref], 1).astype(np.float16), ref % 5 != 0, (ref % 7).astype(np.int32))
        for a in answer:
            a.setflags(write=False)  # as Ray hands them out
        return answer

    def publish(self, steps, indices, logits, classes=None) -> None:
        self.published.append((steps, indices, logits))


def test_each_step_gets_the_teachers_of_its_own_batch():
    ds = InMemoryDataset(torch.arange(60.0).unsqueeze(1), torch.zeros(60, dtype=torch.long))
    batches = train_batches(ds, 6, seed=1, rank=0, world_size=1)
    upcoming = Lookahead(train_indices(ds, 6, seed=1, rank=0, world_size=1))
    client = FakeClient()
    exchange = LogitsTeacher(client, chunk=4, device=CPU)
    served, masked = 0, 0
    for step in range(40):
        x, _, idx = next(batches)
        next(upcoming)
        if step < 3:  # burn-in: the teacher is not asked
            continue
        found = exchange.teacher(x, step, CPU, upcoming)
        if step == 3:
            assert found is None  # the first chunk is asked for from the next step on
            continue
        has = (idx % 5 != 0).numpy()
        if not has.any():
            assert found is None
            continue
        logits, mask, ages = found
        assert logits.dtype == torch.float32 and torch.equal(logits[:, 0], idx.float())
        if has.all():
            assert mask is None  # every sample has a teacher: the loss skips the mask
        else:
            masked += 1
            assert mask.dtype == torch.bool and mask.numpy().tolist() == has.tolist()
        assert ages.tolist() == (idx.numpy() % 7)[has].tolist()
        served += 1
    assert served >= 30 and masked > 0
    # one broker call per chunk of 4 steps, each naming the samples of those 4 batches
    assert all(len(f) == 4 * 6 for f in client.fetches) and len(client.fetches) == 10
    # each call names its chunk's first step (random_peer draws the chunk's peer from it)
    assert client.fetch_steps == list(range(4, 44, 4))


class ProbsClient(FakeClient):
    """Answers probabilities as float16 leaves them: rows that sum to about 1, and rows of 0
    where there is no teacher."""

    def resolve(self, ref):
        probs = np.tile(np.float16([0.1, 0.2, 0.3, 0.401]), (ref.size, 1))
        has = ref % 5 != 0
        probs[~has] = 0
        return probs, has, np.zeros(ref.size, np.int32)


def test_probability_teachers_are_scaled_back_to_a_sum_of_one():
    ds = InMemoryDataset(torch.arange(60.0).unsqueeze(1), torch.zeros(60, dtype=torch.long))
    upcoming = Lookahead(train_indices(ds, 6, seed=1, rank=0, world_size=1))
    batches = train_batches(ds, 6, seed=1, rank=0, world_size=1)
    exchange = LogitsTeacher(ProbsClient(), chunk=4, device=CPU, probs=True)
    served = 0
    for step in range(12):
        x, _, _ = next(batches)
        next(upcoming)
        found = exchange.teacher(x, step, CPU, upcoming)
        if found is not None:
            probs, mask, _ = found
            rows = probs if mask is None else probs[mask]
            assert torch.allclose(rows.sum(1), torch.ones(len(rows)), atol=1e-6) and torch.isfinite(probs).all()
            served += 1
    assert served >= 8


class WeightsClient:
    replica = 1

    def get_weights_async(self):
        return None  # no answer: the test loads the peers itself


class Peer(torch.nn.Module):
    """A teacher model that counts its forward passes and answers constant logits."""

    def __init__(self, logits) -> None:
        super().__init__()
        self.logits, self.calls = torch.tensor(logits), 0

    def forward(self, x):
        self.calls += 1
        return self.logits.expand(x.shape[0], -1)


def _weights_teacher(rule: str, seed: int = 0) -> WeightsTeacher:
    exchange = WeightsTeacher(WeightsClient(), None, every=10, device=CPU, rule=rule, temperature=2.0, seed=seed)
    # peers 0, 2, 3 loaded at steps 40, 30, 20; peer 3 was 10 steps ahead of us when asked
    exchange.peers = {0: (Peer([1.0, 0.0, 0.0]), 40), 2: (Peer([0.0, 2.0, 0.0]), 30), 3: (Peer([0.0, 0.0, 4.0]), 20)}
    exchange.lead = {3: 10}
    return exchange


def test_weights_teacher_rules():
    """Weights mode: the mean of the loaded peers' logits, or of their softmaxes at the
    temperature, or one peer per step (drawn as the broker draws) whose forward pass alone runs."""
    x = torch.zeros(5, 2)
    exchange = _weights_teacher("mean_logits")
    logits, mask, ages = exchange.teacher(x, 50, CPU, None)
    assert mask is None and torch.allclose(logits, torch.tensor([1.0, 2.0, 4.0]).div(3).expand(5, 3))
    assert ages.tolist() == [10, 20, 40]  # in each peer's own steps
    assert exchange.tally["peer_ages"] == {0: [10, 1], 2: [20, 1], 3: [40, 1]}  # per pair, one per step taught
    probs, _, _ = _weights_teacher("mean_probs").teacher(x, 50, CPU, None)
    expected = torch.stack([torch.softmax(torch.tensor(z) / 2.0, 0) for z in
                            ([1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 4.0])]).mean(0)
    assert torch.allclose(probs, expected.expand(5, 3)) and torch.allclose(probs.sum(1), torch.ones(5))

    exchange = _weights_teacher("random_peer")
    peers = {0: [1.0, 0.0, 0.0], 2: [0.0, 2.0, 0.0], 3: [0.0, 0.0, 4.0]}
    drawn = []
    for step in range(50, 80):
        calls = {p: m.calls for p, (m, _) in exchange.peers.items()}
        teacher, mask, ages = exchange.teacher(x, step, CPU, None)
        peer = draw_peer(0, 1, step, [0, 2, 3])
        assert torch.equal(teacher, torch.tensor(peers[peer]).expand(5, 3)) and len(ages) == 1
        assert {p: m.calls - calls[p] for p, (m, _) in exchange.peers.items()} == {p: int(p == peer) for p in peers}
        drawn.append(peer)
    assert set(drawn) == {0, 2, 3}
    again = _weights_teacher("random_peer")
    assert [int(again.teacher(x, step, CPU, None)[0][0].argmax()) for step in range(50, 80)] == [
        {0: 0, 2: 1, 3: 2}[p] for p in drawn]


def test_own_logits_go_out_in_whole_chunks_as_float16():
    client = FakeClient()
    exchange = LogitsTeacher(client, chunk=3, device=CPU)
    for step in range(7):
        exchange.publish(step, torch.arange(2) + 10 * step, torch.full((2, 4), float(step), requires_grad=True))
    assert len(client.published) == 2  # steps 0-2 and 3-5; step 6 waits for its chunk
    steps, indices, logits = client.published[1]
    assert steps.tolist() == [3, 3, 4, 4, 5, 5]
    assert indices.tolist() == [30, 31, 40, 41, 50, 51]
    assert logits.dtype == np.float16 and logits.shape == (6, 4) and logits[-1, 0] == 5
    exchange.flush()  # the end of training sends the rest
    assert client.published[2][0].tolist() == [6, 6]
