"""Datasets and their splits, with sample indices; per-replica, per-worker batch order.

This module owns:
- `load_splits`: train / val / test splits of every supported dataset (mnist1d, synthetic,
  imagefolder, cifar10, text). Every item is `(x, y, idx)`, where idx is the sample's position in
  its split; for the train split it is the global key the broker files teacher logits under. A
  text sample is a window of tokens and its target the next token at every position (`text.py`).
- `train_batches`: the endless batch stream of one worker: each replica has its own order, the
  workers of one replica get disjoint shards each epoch, and a resumed stream continues exactly
  where a fresh one would be.
- `train_indices`: the sample indices of those batches, without loading the samples.
- `eval_batches`: a whole split, in order.

Nothing is ever downloaded: image data must already be on disk under `data.root`.
Image data is not augmented: train, val and test share one deterministic transform, so a val set
carved from the training folder is evaluated exactly like the test set.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .config import DataConfig
from .errors import DataError
from .text import Vocab, load_corpus, windows

Batch = tuple[Tensor, Tensor, Tensor]  # (x, y, idx)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class InMemoryDataset(Dataset):
    """Whole split as two tensors, so batches are gathered with one indexing op."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        return self.x[i], self.y[i], i


class ImageDataset(Dataset):
    """A subset of a torchvision dataset, renumbered 0..len-1."""

    def __init__(self, base: Dataset, indices: list[int]) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        x, y = self.base[self.indices[i]]
        return x, y, i


@dataclass
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]  # of one sample, e.g. (40,) or (3, 32, 32); text: (block_size,)
    name: str = "data"  # dataset name, for `describe`
    vocab: Vocab | None = None  # text: the tokens (num_classes is its size); None for classifiers
    source: str = ""  # text: where the corpus came from and its size, for `describe`

    @property
    def is_text(self) -> bool:
        """A language model's data: per sample a window of tokens, targets and outputs per token."""
        return self.vocab is not None


# -- loading ---------------------------------------------------------------------------------------

def load_splits(cfg: DataConfig) -> Splits:
    loaders = {"mnist1d": _mnist1d, "synthetic": _synthetic, "imagefolder": _imagefolder, "cifar10": _cifar10,
               "text": _text}
    return loaders[cfg.name](cfg)


def _holdout(n: int, fraction: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Seeded (kept, held-out) index split; both sorted so kept samples stay in source order."""
    n_held = max(1, round(n * fraction))
    perm = torch.randperm(n, generator=gen)
    return perm[n_held:].sort().values, perm[:n_held].sort().values


def _tensor_splits(cfg: DataConfig, x: Tensor, y: Tensor, x_test: Tensor, y_test: Tensor,
                   num_classes: int) -> Splits:
    # The val split depends on data_seed only, so every replica and method validates on the same samples.
    train_idx, val_idx = _holdout(len(y), cfg.val_fraction, torch.Generator().manual_seed(cfg.data_seed))
    return Splits(
        train=InMemoryDataset(x[train_idx], y[train_idx]),
        val=InMemoryDataset(x[val_idx], y[val_idx]),
        test=InMemoryDataset(x_test, y_test),
        num_classes=num_classes,
        input_shape=tuple(x.shape[1:]),
        name=cfg.name,
    )


def _mnist1d(cfg: DataConfig) -> Splits:
    from mnist1d.data import get_dataset_args, make_dataset  # imports matplotlib: only when needed

    args = get_dataset_args()
    args.num_samples = cfg.num_samples
    args.train_split = 1 - cfg.test_fraction
    args.seed = cfg.data_seed
    # make_dataset reseeds the global numpy / random generators; put the caller's state back.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    # Inputs stay as generated (the generator already centres them), as in the MNIST-1D paper.
    x, x_test = (torch.from_numpy(raw[k]).float() for k in ("x", "x_test"))
    y, y_test = (torch.from_numpy(raw[k]).long() for k in ("y", "y_test"))
    return _tensor_splits(cfg, x, y, x_test, y_test, num_classes=10)


def _synthetic(cfg: DataConfig) -> Splits:
    """Gaussian classes: one random mean per class plus unit noise."""
    gen = torch.Generator().manual_seed(cfg.data_seed)
    # Means ~3 noise std apart whatever the length: a small MLP reaches ~85% (10 classes) in 50
    # steps, well above chance yet below 100%, so there is still something to gain from distillation.
    means = torch.randn(cfg.num_classes, cfg.length, generator=gen) * (3.0 / math.sqrt(cfg.length))
    y = torch.arange(cfg.num_samples)[torch.randperm(cfg.num_samples, generator=gen)] % cfg.num_classes
    x = means[y] + torch.randn(cfg.num_samples, cfg.length, generator=gen)
    n_test = max(1, round(cfg.num_samples * cfg.test_fraction))
    return _tensor_splits(cfg, x[n_test:], y[n_test:], x[:n_test], y[:n_test], cfg.num_classes)


def _root_error(path: Path, reason: str) -> DataError:
    reason = str(reason).strip().splitlines()[0] if str(reason).strip() else "cannot be read"
    return DataError(f"data.root: {path}: {reason}")


def _image_root(cfg: DataConfig) -> Path:
    root = Path(cfg.root or "").expanduser()
    if not root.exists():
        raise _root_error(root, "no such folder")
    if not root.is_dir():
        raise _root_error(root, "not a folder")
    return root


def _image_splits(cfg: DataConfig, base: Dataset, pool: Tensor, test: Dataset, classes: list[str],
                  gen: torch.Generator) -> Splits:
    """Train and val from `pool` (indices into `base`); the val share is seeded by data_seed."""
    keep, held = _holdout(len(pool), cfg.val_fraction, gen)
    if len(keep) == 0:
        raise DataError(f"data.root: {cfg.root}: too few samples ({len(pool)}) to carve a val split")
    train = ImageDataset(base, pool[keep].tolist())
    return Splits(
        train=train,
        val=ImageDataset(base, pool[held].tolist()),
        test=test,
        num_classes=len(classes),
        input_shape=tuple(train[0][0].shape),
        name=cfg.name,
    )


def _imagefolder(cfg: DataConfig) -> Splits:
    from torchvision import datasets, transforms as T

    root = _image_root(cfg)
    transform = T.Compose([T.Resize(cfg.image_size), T.CenterCrop(cfg.image_size), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def folder(path: Path) -> Dataset:
        try:
            return datasets.ImageFolder(str(path), transform=transform)
        except (FileNotFoundError, RuntimeError, OSError) as err:
            raise _root_error(path, str(err)) from err

    gen = torch.Generator().manual_seed(cfg.data_seed)
    train_dir = root / "train" if (root / "train").is_dir() else root
    test_dir = next((root / s for s in ("val", "test") if train_dir != root and (root / s).is_dir()), None)
    base = folder(train_dir)
    if test_dir is None:
        # No separate test folder: hold out a seeded test share first, then carve val from the rest.
        pool, test_idx = _holdout(len(base), cfg.test_fraction, gen)
        return _image_splits(cfg, base, pool, ImageDataset(base, test_idx.tolist()), base.classes, gen)
    test = folder(test_dir)
    if test.classes != base.classes:
        raise _root_error(test_dir, f"classes {test.classes} differ from those of {train_dir}: {base.classes}")
    return _image_splits(cfg, base, torch.arange(len(base)), ImageDataset(test, list(range(len(test)))),
                         base.classes, gen)


def _cifar10(cfg: DataConfig) -> Splits:
    from torchvision import datasets, transforms as T

    root = _image_root(cfg)
    transform = T.Compose([T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    try:
        train = datasets.CIFAR10(str(root), train=True, transform=transform, download=False)
        test = datasets.CIFAR10(str(root), train=False, transform=transform, download=False)
    except (RuntimeError, FileNotFoundError, OSError) as err:
        raise _root_error(root, f"no CIFAR-10 data (expected cifar-10-batches-py/ inside): {err}") from err
    return _image_splits(cfg, train, torch.arange(len(train)), ImageDataset(test, list(range(len(test)))),
                         train.classes, torch.Generator().manual_seed(cfg.data_seed))


def _text(cfg: DataConfig) -> Splits:
    corpus = load_corpus(cfg)
    x = {split: windows(corpus.vocab.encode(corpus.text[split]), cfg.block_size) for split in corpus.text}
    return Splits(train=InMemoryDataset(*x["train"]), val=InMemoryDataset(*x["val"]),
                  test=InMemoryDataset(*x["test"]), num_classes=len(corpus.vocab), input_shape=(cfg.block_size,),
                  name=cfg.name, vocab=corpus.vocab, source=corpus.summary())


# -- batches ---------------------------------------------------------------------------------------

def _order_seed(seed: int) -> int:
    # DistributedSampler shuffles epoch e with seed + e, so replicas seeded s and s + 1 would see
    # the same orders one epoch apart; a hashed seed keeps the replicas' orders unrelated.
    return int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(seed)))


def _shard_batches(ds: Dataset, batch_size: int, seed: int, rank: int, world_size: int,
                   start_step: int) -> Iterator[Tensor]:
    sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True,
                                 seed=_order_seed(seed), drop_last=True)
    per_epoch = len(sampler) // batch_size
    if per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} is larger than one worker's shard ({len(sampler)} of "
                         f"{len(ds)} samples over {world_size} workers); use a smaller batch or fewer workers")
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    epoch, offset = divmod(start_step, per_epoch)
    while True:
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), dtype=torch.long)
        for b in range(offset, per_epoch):
            yield order[b * batch_size:(b + 1) * batch_size]
        epoch, offset = epoch + 1, 0


def train_batches(ds: Dataset, batch_size: int, seed: int, rank: int, world_size: int,
                  start_step: int = 0, num_workers: int = 0) -> Iterator[Batch]:
    """Endless (x, y, idx) batches for worker `rank` of a replica whose data order is `seed`.

    The `world_size` workers of one replica get disjoint shards of every epoch; the batch at step k
    is the same whether the stream started at 0 or at `start_step=k`.
    """
    batches = _shard_batches(ds, batch_size, seed, rank, world_size, start_step)
    if isinstance(ds, InMemoryDataset):
        return ((ds.x[b], ds.y[b], b) for b in batches)
    loader = DataLoader(ds, batch_sampler=(b.tolist() for b in batches), num_workers=num_workers)
    return iter(loader)


def train_indices(ds: Dataset, batch_size: int, seed: int, rank: int, world_size: int,
                  start_step: int = 0) -> Iterator[Tensor]:
    """The sample indices of `train_batches`' batches, in the same order, without loading a sample:
    a worker looks ahead at what it will train on (to ask for its teachers early) this way."""
    return _shard_batches(ds, batch_size, seed, rank, world_size, start_step)


def eval_batches(ds: Dataset, batch_size: int, num_workers: int = 0) -> Iterator[Batch]:
    """The whole split in order; the last batch may be short."""
    if isinstance(ds, InMemoryDataset):
        return ((ds.x[s:s + batch_size], ds.y[s:s + batch_size], torch.arange(s, min(s + batch_size, len(ds))))
                for s in range(0, len(ds), batch_size))
    return iter(DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers))


def probe_split(splits: Splits, size: int) -> Dataset:
    """The fixed divergence probe: the first `size` validation samples (the validation split is a
    seeded random carve, so these are a random sample, the same for every replica and method)."""
    n = min(size, len(splits.val))
    if isinstance(splits.val, InMemoryDataset):
        return InMemoryDataset(splits.val.x[:n], splits.val.y[:n])
    return Subset(splits.val, range(n))


def describe(splits: Splits) -> str:
    if splits.is_text:
        return (f"text, {splits.source}; windows of {splits.input_shape[0]}: {len(splits.train)} train / "
                f"{len(splits.val)} val / {len(splits.test)} test")
    return (f"{splits.name}: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test, "
            f"{splits.num_classes} classes, input {splits.input_shape}")
