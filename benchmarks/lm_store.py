"""Memory of the logits store for a language model: bytes per replica for the default corpus.

Builds the real `TeacherStore` of a run of configs/shakespeare.yaml in logits mode (the windows
of the training text, the vocabulary, windows of 64), fills it as a replica's publications would
(every window once, in chunks), and prints what it holds: the arrays' bytes (`nbytes`, the
figure the broker reports as `teacher_bytes`) and how much this process's resident memory grew
(numpy allocates the arrays on first use and the OS maps pages as they are written), full and
top-k, for the whole training text and for smaller `data.train_chars`.

    python benchmarks/lm_store.py [--topk 8 4] [--train-chars 500000 100000]
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from common import REPO, command, load_average, machine

from ray_codistill.config import load_config
from ray_codistill.data import load_splits
from ray_codistill.fmt import human_bytes, markdown_table
from ray_codistill.store import TeacherStore


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def fill(windows: int, block: int, vocab: int, topk: int | None, chunk: int = 384) -> tuple[int, int]:
    """A store of one replica filled with every window once: (its nbytes, resident growth). Run in
    a fresh process per case: memory an earlier case freed would otherwise be reused unseen."""
    before = rss_bytes()
    store = TeacherStore(1, windows, vocab, topk=topk, positions=block)
    rng = np.random.default_rng(0)
    width = topk or vocab
    values = rng.normal(size=(chunk, block, width)).astype(np.float16)
    classes = np.tile(np.arange(width, dtype=np.int16), (chunk, block, 1)) if topk else None
    for step, start in enumerate(range(0, windows, chunk)):
        idx = np.arange(start, min(start + chunk, windows))
        reason = store.publish(0, 0, step, idx, values[:len(idx)], None if classes is None else classes[:len(idx)])
        assert reason is None, reason
    grown = rss_bytes() - before
    return store.nbytes(), grown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--topk", type=int, nargs="+", default=[8, 4], help="top-k values to measure")
    parser.add_argument("--train-chars", type=int, nargs="+", default=[500_000, 100_000],
                        help="smaller training texts to measure besides the whole")
    args = parser.parse_args(argv)
    print(f"machine: {machine()}; {load_average()}")
    print(f"command: {command()}")
    rows = []
    for chars in [None, *args.train_chars]:
        cfg = load_config(REPO / "configs/shakespeare.yaml",
                          [f"data.train_chars={chars}"] if chars else [])
        splits = load_splits(cfg.data)
        windows, block, vocab = len(splits.train), splits.input_shape[0], splits.num_classes
        for k in [None, *args.topk]:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
                nbytes, grown = pool.submit(fill, windows, block, vocab, k).result()
            rows.append([f"{chars:,}" if chars else f"all ({windows * block:,})", f"{windows:,}", str(vocab),
                         "full" if k is None else f"top-{k}", human_bytes(nbytes),
                         human_bytes(grown), human_bytes(nbytes / windows)])
            print(f"  {rows[-1]}", flush=True)
    print(f"\nthe store of one replica (a broker holds one per replica; shards split it), windows of {block}; "
          f"the vocabulary is the training text's\n")
    print(markdown_table(["training characters", "windows", "vocabulary", "logits", "store bytes",
                          "resident growth", "per window"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
