"""Splits, sample indices, per-worker sharding and resumption, and error messages of data.py."""

import itertools
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from ray_codistill.config import DataConfig
from ray_codistill.data import (DataError, ImageDataset, InMemoryDataset, describe, eval_batches, load_splits,
                                train_batches, train_indices)


@pytest.fixture(scope="module")
def mnist1d():
    return load_splits(DataConfig(name="mnist1d"))


def idx_of(batches, n):
    return [b[2] for b in itertools.islice(batches, n)]


# -- mnist1d / synthetic -----------------------------------------------------------------------------

def test_mnist1d_splits(mnist1d):
    s = mnist1d
    assert (len(s.train), len(s.val), len(s.test)) == (3600, 400, 1000)  # 5000 = 4000 train+val / 1000 test
    assert s.num_classes == 10 and s.input_shape == (40,)
    assert s.train.x.dtype == torch.float32 and s.train.y.dtype == torch.int64
    assert set(s.train.y.tolist()) == set(range(10))
    for split in (s.train, s.val, s.test):
        x, y, idx = split[7]
        assert idx == 7 and x.shape == (40,)
        assert torch.equal(x, split.x[7]) and y == split.y[7]
    assert describe(s) == "mnist1d: 3600 train / 400 val / 1000 test, 10 classes, input (40,)"


def test_mnist1d_deterministic_and_val_disjoint(mnist1d):
    np.random.seed(123)
    expected_next = np.random.rand()
    np.random.seed(123)
    again = load_splits(DataConfig(name="mnist1d"))
    assert np.random.rand() == expected_next  # the caller's global numpy RNG is left alone
    for a, b in ((mnist1d.train, again.train), (mnist1d.val, again.val), (mnist1d.test, again.test)):
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    train_rows = {tuple(r) for r in mnist1d.train.x.tolist()}
    assert not any(tuple(r) in train_rows for r in mnist1d.val.x.tolist())
    other = load_splits(DataConfig(name="mnist1d", num_samples=1000, data_seed=1))
    assert (len(other.train), len(other.val), len(other.test)) == (720, 80, 200)


def test_splits_pickle_roundtrip():
    s = load_splits(DataConfig(name="synthetic", num_samples=200))
    t = pickle.loads(pickle.dumps(s))
    assert torch.equal(t.train.x, s.train.x) and t.input_shape == s.input_shape


def test_synthetic_is_learnable():
    s = load_splits(DataConfig(name="synthetic", num_samples=2000, num_classes=5, length=20, data_seed=3))
    assert s.input_shape == (20,) and s.num_classes == 5
    assert (len(s.train), len(s.val), len(s.test)) == (1440, 160, 400)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for x, y, _ in itertools.islice(train_batches(s.train, 64, seed=0, rank=0, world_size=1), 50):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        acc = (model(s.test.x).argmax(1) == s.test.y).float().mean().item()
    assert acc > 0.7, acc  # chance is 0.2


# -- train_batches / eval_batches --------------------------------------------------------------------

def toy(n=96):
    return InMemoryDataset(torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n) % 3)


def test_workers_of_one_replica_get_disjoint_shards():
    ds = toy(96)
    per_epoch = 48 // 8  # each of 2 workers holds 48 samples -> 6 batches of 8
    for epoch in range(2):
        seen = []
        for rank in (0, 1):
            batches = idx_of(train_batches(ds, 8, seed=5, rank=rank, world_size=2), per_epoch * (epoch + 1))
            seen.append(torch.cat(batches[epoch * per_epoch:]))
        assert set(seen[0].tolist()).isdisjoint(seen[1].tolist())
        assert sorted(torch.cat(seen).tolist()) == list(range(96))


def test_batches_match_their_indices():
    ds = toy(50)
    for x, y, idx in itertools.islice(train_batches(ds, 7, seed=1, rank=0, world_size=1), 10):
        assert x.shape == (7, 1) and torch.equal(x[:, 0].long(), idx) and torch.equal(y, idx % 3)


def test_order_depends_on_seed_only():
    ds = toy(96)
    a = idx_of(train_batches(ds, 8, seed=0, rank=0, world_size=1), 24)
    b = idx_of(train_batches(ds, 8, seed=0, rank=0, world_size=1), 24)
    c = idx_of(train_batches(ds, 8, seed=1, rank=0, world_size=1), 24)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(torch.cat(a), torch.cat(c))
    # Replicas seeded s and s + 1 must not replay each other's epochs one epoch apart.
    assert not torch.equal(torch.cat(a[12:]), torch.cat(c[:12]))


@pytest.mark.parametrize("k", [0, 3, 5, 6, 13])  # 5 batches per epoch: 5 and 13 cross epoch boundaries
def test_start_step_resumes_exactly(k):
    ds = toy(90)
    fresh = idx_of(train_batches(ds, 9, seed=2, rank=1, world_size=2), k + 6)
    resumed = idx_of(train_batches(ds, 9, seed=2, rank=1, world_size=2, start_step=k), 6)
    assert all(torch.equal(u, v) for u, v in zip(fresh[k:], resumed))


@pytest.mark.parametrize("start", [0, 7])
def test_train_indices_are_the_batches_indices(start):
    """The look-ahead a worker asks the broker with must name the samples it will train on."""
    ds = toy(90)
    batches = idx_of(train_batches(ds, 9, seed=3, rank=1, world_size=2, start_step=start), 12)
    indices = list(itertools.islice(train_indices(ds, 9, seed=3, rank=1, world_size=2, start_step=start), 12))
    assert all(torch.equal(u, v) for u, v in zip(batches, indices))


def test_batch_larger_than_shard_is_refused():
    with pytest.raises(ValueError, match="batch_size 40"):
        next(train_batches(toy(60), 40, seed=0, rank=0, world_size=2))


def test_eval_batches_cover_split_in_order():
    ds = toy(25)
    batches = list(eval_batches(ds, 10))
    assert [len(b[2]) for b in batches] == [10, 10, 5]
    assert torch.cat([b[2] for b in batches]).tolist() == list(range(25))
    assert torch.equal(torch.cat([b[0] for b in batches]), ds.x)


# -- image data -------------------------------------------------------------------------------------

def write_images(folder, per_class=6, classes=("cat", "dog")):
    rng = np.random.default_rng(0)
    for c in classes:
        (folder / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / c / f"{i}.png")


def test_imagefolder_with_train_and_val(tmp_path):
    write_images(tmp_path / "train", per_class=10)
    write_images(tmp_path / "val", per_class=3)
    s = load_splits(DataConfig(name="imagefolder", root=str(tmp_path), image_size=16, val_fraction=0.2))
    assert (len(s.train), len(s.val), len(s.test)) == (16, 4, 6)
    assert s.num_classes == 2 and s.input_shape == (3, 16, 16)
    assert set(s.train.indices).isdisjoint(s.val.indices)
    x, y, idx = next(train_batches(s.train, 4, seed=0, rank=0, world_size=1))
    assert x.shape == (4, 3, 16, 16) and y.dtype == torch.int64 and idx.max() < 16
    assert torch.equal(next(train_indices(s.train, 4, seed=0, rank=0, world_size=1)), idx)
    x0, y0, i0 = s.train[int(idx[0])]
    assert torch.equal(x0, x[0]) and y0 == y[0] and i0 == idx[0]
    assert [len(b[2]) for b in eval_batches(s.test, 4)] == [4, 2]
    assert pickle.loads(pickle.dumps(s)).train[0][0].shape == (3, 16, 16)


def test_imagefolder_without_train_subfolder_holds_out_test(tmp_path):
    write_images(tmp_path, per_class=10)
    cfg = DataConfig(name="imagefolder", root=str(tmp_path), image_size=8, test_fraction=0.25, val_fraction=0.2)
    s = load_splits(cfg)
    assert (len(s.train), len(s.val), len(s.test)) == (12, 3, 5)
    assert isinstance(s.test, ImageDataset)
    used = s.train.indices + s.val.indices + s.test.indices
    assert sorted(used) == list(range(20))  # disjoint and complete
    assert load_splits(cfg).val.indices == s.val.indices


def test_image_roots_that_cannot_be_loaded(tmp_path):
    with pytest.raises(DataError, match=r"data\.root: .*missing: no such folder"):
        load_splits(DataConfig(name="imagefolder", root=str(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"data\.root: .*empty"):
        load_splits(DataConfig(name="imagefolder", root=str(tmp_path / "empty")))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match="not a folder"):
        load_splits(DataConfig(name="imagefolder", root=str(tmp_path / "file.txt")))
    with pytest.raises(DataError, match=r"data\.root: .*empty.*CIFAR-10"):
        load_splits(DataConfig(name="cifar10", root=str(tmp_path / "empty")))
