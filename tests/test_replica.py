"""LogitsTeacher without Ray: each step gets the teachers of its own batch, asked ahead in chunks."""

from __future__ import annotations

import numpy as np
import torch

from ray_codistill.data import InMemoryDataset, train_batches, train_indices
from ray_codistill.replica import Lookahead, LogitsTeacher

CPU = torch.device("cpu")


class FakeClient:
    """Answers a fetch at once, from the indices alone: teacher logits (index, -index), a mask
    (no teacher for multiples of 5) and an age (index % 7)."""

    replica = 0

    def __init__(self) -> None:
        self.fetches: list[np.ndarray] = []
        self.published: list[tuple] = []

    def fetch_async(self, indices: np.ndarray):
        self.fetches.append(indices.copy())
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
