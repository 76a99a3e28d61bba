"""The codistillation loss against hand computations (numpy / explicit formulas)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ray_codistill.loss import alpha_at, codistill_loss, distillation_per_sample

STUDENT = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
TEACHER = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]]


def _np_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _np_kl(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """KL(p || q) per row."""
    return (p * (np.log(p) - np.log(q))).sum(axis=-1)


def test_alpha_zero_is_plain_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(8, 5)
    targets = torch.randint(0, 5, (8,))
    teacher = torch.randn(8, 5)
    expected = F.cross_entropy(logits, targets)
    for t in (None, teacher):
        total, ce, distill = codistill_loss(logits, targets, t, alpha=0.0)
        assert torch.equal(total, expected)
        assert torch.equal(ce, expected)
        assert distill.shape == () and distill.item() == 0.0


def test_cross_entropy_by_hand():
    logits = torch.tensor(STUDENT)
    targets = torch.tensor([1, 2])
    x = np.array(STUDENT)
    expected = -np.mean(np.log(_np_softmax(x))[[0, 1], [1, 2]])
    _, ce, _ = codistill_loss(logits, targets)
    assert ce.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("distance", ["kl", "mse"])
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_identical_logits_give_zero(distance, temperature):
    torch.manual_seed(1)
    z = torch.randn(6, 10) * 5
    per = distillation_per_sample(z, z.clone(), distance, temperature)
    assert per.shape == (6,)
    assert torch.allclose(per, torch.zeros(6), atol=1e-5)


def test_kl_two_class_literal():
    # softmax([ln 3, 0]) = [3/4, 1/4]; softmax([0, 0]) = [1/2, 1/2]
    # KL(teacher || student) = 3/4 ln(3/2) + 1/4 ln(1/2)
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    per = distillation_per_sample(student, teacher, "kl", 1.0)
    assert per.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.1308120, abs=1e-6)


def test_kl_values_with_and_without_temperature():
    s, t = np.array(STUDENT), np.array(TEACHER)
    student, teacher = torch.tensor(STUDENT), torch.tensor(TEACHER)

    expected_t1 = _np_kl(_np_softmax(t), _np_softmax(s))
    per_t1 = distillation_per_sample(student, teacher, "kl", 1.0)
    np.testing.assert_allclose(per_t1.numpy(), expected_t1, rtol=1e-5)

    T = 2.0
    raw_t2 = _np_kl(_np_softmax(t / T), _np_softmax(s / T))
    per_t2 = distillation_per_sample(student, teacher, "kl", T)
    # softened KL, scaled back by T^2 = 4
    np.testing.assert_allclose(per_t2.numpy(), raw_t2 * T**2, rtol=1e-5)
    np.testing.assert_allclose(per_t2.numpy() / 4.0, raw_t2, rtol=1e-5)
    assert not np.allclose(per_t2.numpy(), raw_t2)  # the scaling is really applied


def test_kl_direction_is_teacher_to_student():
    s, t = np.array(STUDENT), np.array(TEACHER)
    forward = _np_kl(_np_softmax(t), _np_softmax(s))  # KL(teacher || student)
    reverse = _np_kl(_np_softmax(s), _np_softmax(t))  # KL(student || teacher)
    assert np.all(np.abs(forward - reverse) > 1e-2)  # the example is not symmetric
    per = distillation_per_sample(torch.tensor(STUDENT), torch.tensor(TEACHER), "kl", 1.0)
    np.testing.assert_allclose(per.numpy(), forward, rtol=1e-5)
    assert not np.allclose(per.numpy(), reverse, rtol=1e-3)


def test_mse_by_hand():
    s, t = np.array(STUDENT), np.array(TEACHER)
    expected = ((s - t) ** 2).mean(axis=-1)  # [(1+4+0.25)/3, (1+4+25)/3]
    np.testing.assert_allclose(expected, [5.25 / 3, 30.0 / 3])
    per = distillation_per_sample(torch.tensor(STUDENT), torch.tensor(TEACHER), "mse", 7.0)
    np.testing.assert_allclose(per.numpy(), expected, rtol=1e-6)


def test_unknown_distance_raises():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="distance"):
        distillation_per_sample(z, z, "cosine", 1.0)
    with pytest.raises(ValueError, match="distance"):
        codistill_loss(z, torch.tensor([0, 1]), z, alpha=1.0, distance="js")


@pytest.mark.parametrize("distance", ["kl", "mse"])
def test_total_is_ce_plus_alpha_times_mean_distance(distance):
    student, teacher = torch.tensor(STUDENT), torch.tensor(TEACHER)
    targets = torch.tensor([0, 2])
    s, t = np.array(STUDENT), np.array(TEACHER)
    if distance == "kl":
        per = _np_kl(_np_softmax(t / 2.0), _np_softmax(s / 2.0)) * 4.0
    else:
        per = ((s - t) ** 2).mean(axis=-1)
    total, ce, distill = codistill_loss(
        student, targets, teacher, alpha=0.3, distance=distance, temperature=2.0
    )
    assert distill.item() == pytest.approx(per.mean(), rel=1e-5)
    assert total.item() == pytest.approx(ce.item() + 0.3 * per.mean(), rel=1e-5)
    assert total.shape == ce.shape == distill.shape == ()


def test_mask_divides_by_full_batch_and_blocks_gradient():
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher = torch.tensor(TEACHER)
    targets = torch.tensor([0, 2])
    mask = torch.tensor([True, False])
    s, t = np.array(STUDENT), np.array(TEACHER)
    per0 = _np_kl(_np_softmax(t[:1]), _np_softmax(s[:1]))[0]

    _, _, distill = codistill_loss(student, targets, teacher, mask=mask, alpha=1.0)
    # sum over samples with a teacher, divided by B = 2 (not by the 1 valid sample)
    assert distill.item() == pytest.approx(per0 / 2, rel=1e-5)
    distill.backward()
    assert torch.count_nonzero(student.grad[1]) == 0  # masked sample: no gradient from distill
    assert torch.count_nonzero(student.grad[0]) > 0


def test_nan_teacher_under_false_mask_is_ignored():
    student = torch.tensor(STUDENT, requires_grad=True)
    targets = torch.tensor([0, 2])
    teacher = torch.tensor([TEACHER[0], [float("nan")] * 3])
    mask = torch.tensor([True, False])
    for distance in ("kl", "mse"):
        student.grad = None
        total, ce, distill = codistill_loss(
            student, targets, teacher, mask=mask, alpha=0.5, distance=distance
        )
        assert torch.isfinite(total) and torch.isfinite(distill)
        total.backward()
        assert torch.isfinite(student.grad).all()
    # No sample with a teacher at all: distill is exactly zero, total is ce.
    total, ce, distill = codistill_loss(
        student, targets, teacher, mask=torch.tensor([False, False]), alpha=0.5
    )
    assert distill.item() == 0.0 and total.item() == ce.item()
    # alpha == 0 never looks at the teacher, NaN or not.
    total, ce, _ = codistill_loss(student, targets, torch.full((2, 3), float("nan")), alpha=0.0)
    assert torch.isfinite(total) and total.item() == ce.item()


def test_mask_must_be_bool_of_batch_shape():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="mask"):
        codistill_loss(z, torch.tensor([0, 1]), z, mask=torch.tensor([1, 0]), alpha=1.0)
    with pytest.raises(ValueError, match="mask"):
        codistill_loss(z, torch.tensor([0, 1]), z, mask=torch.tensor([True]), alpha=1.0)


@pytest.mark.parametrize("distance", ["kl", "mse"])
def test_teacher_gets_no_gradient(distance):
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher = torch.tensor(TEACHER, requires_grad=True)
    total, _, _ = codistill_loss(
        student, torch.tensor([0, 1]), teacher, alpha=1.0, distance=distance
    )
    total.backward()
    assert teacher.grad is None
    assert student.grad is not None


def test_alpha_at_burn_in_and_ramp():
    assert alpha_at(0, 0.5, burn_in=10, ramp_steps=20) == 0.0
    assert alpha_at(9, 0.5, burn_in=10, ramp_steps=20) == 0.0
    assert alpha_at(10, 0.5, burn_in=10, ramp_steps=20) == 0.0
    assert alpha_at(15, 0.5, burn_in=10, ramp_steps=20) == pytest.approx(0.125)
    assert alpha_at(20, 0.5, burn_in=10, ramp_steps=20) == pytest.approx(0.25)
    assert alpha_at(30, 0.5, burn_in=10, ramp_steps=20) == pytest.approx(0.5)
    assert alpha_at(1000, 0.5, burn_in=10, ramp_steps=20) == pytest.approx(0.5)
    # no ramp: alpha as soon as burn-in ends
    assert alpha_at(9, 0.5, burn_in=10, ramp_steps=0) == 0.0
    assert alpha_at(10, 0.5, burn_in=10, ramp_steps=0) == 0.5
    # no burn-in, no ramp: alpha from the first step
    assert alpha_at(0, 0.7, burn_in=0, ramp_steps=0) == 0.7
    with pytest.raises(ValueError):
        alpha_at(0, 0.5, burn_in=-1, ramp_steps=0)


@pytest.mark.parametrize("distance", ["kl", "mse"])
def test_float16_teacher(distance):
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher16 = torch.tensor(TEACHER, dtype=torch.float16)
    per = distillation_per_sample(student, teacher16, distance, 2.0)
    assert per.dtype == torch.float32
    reference = distillation_per_sample(student, teacher16.float(), distance, 2.0)
    assert torch.equal(per, reference)
    total, _, distill = codistill_loss(
        student, torch.tensor([0, 1]), teacher16, alpha=1.0, distance=distance, temperature=2.0
    )
    assert total.dtype == torch.float32 and torch.isfinite(distill)
    total.backward()
    assert torch.isfinite(student.grad).all()


# -- a probability teacher (codistill.teacher_rule = mean_probs) ---------------------------------

@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_probability_teacher_is_kl_to_the_mean_of_the_peers_softmaxes(temperature):
    """mean_probs: the target is the mean of the peers' softmax(z_j / T), not the softmax of their
    mean logits; KL(target || softmax(student / T)) x T^2, as for a logits teacher."""
    T = temperature
    s = np.array(STUDENT)
    peers = [np.array(TEACHER), np.array([[0.0, 3.0, -1.0], [2.0, -2.0, 0.5]])]
    target = np.mean([_np_softmax(z / T) for z in peers], axis=0)
    expected = _np_kl(target, _np_softmax(s / T)) * T**2
    per = distillation_per_sample(torch.tensor(STUDENT), torch.tensor(target), "kl", T, teacher_probs=True)
    np.testing.assert_allclose(per.numpy(), expected, rtol=1e-5)
    # not the same as distilling from the mean logits: the rules differ for R > 2
    of_mean_logits = distillation_per_sample(torch.tensor(STUDENT), torch.tensor(np.mean(peers, axis=0)), "kl", T)
    assert not np.allclose(per.numpy(), of_mean_logits.numpy(), rtol=1e-3)
    # one peer (R = 2): its softmax as target is its logits as teacher
    one = distillation_per_sample(torch.tensor(STUDENT), torch.tensor(_np_softmax(peers[0] / T)), "kl", T,
                                  teacher_probs=True)
    np.testing.assert_allclose(one.numpy(), distillation_per_sample(
        torch.tensor(STUDENT), torch.tensor(TEACHER), "kl", T).numpy(), rtol=1e-5)
    # and through the whole loss, with a mask
    _, _, distill = codistill_loss(torch.tensor(STUDENT), torch.tensor([0, 1]), torch.tensor(target),
                                   mask=torch.tensor([False, True]), alpha=1.0, temperature=T, teacher_probs=True)
    assert distill.item() == pytest.approx(expected[1] / 2, rel=1e-5)


def test_probability_teacher_of_identical_distribution_gives_zero_and_zeros_stay_finite():
    torch.manual_seed(2)
    z = torch.randn(5, 7) * 4
    per = distillation_per_sample(z, F.softmax(z / 3.0, dim=-1), "kl", 3.0, teacher_probs=True)
    assert torch.allclose(per, torch.zeros(5), atol=1e-5)
    # classes with no teacher mass (a float16 probability below 6e-8, or top-k's other classes)
    student = torch.tensor(STUDENT, requires_grad=True)
    q = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]])
    total, _, distill = codistill_loss(student, torch.tensor([0, 2]), torch.tensor(q, dtype=torch.float16),
                                       alpha=1.0, teacher_probs=True)
    q_log_q = np.where(q > 0, q * np.log(np.where(q > 0, q, 1.0)), 0.0)  # 0 log 0 = 0
    expected = (q_log_q - q * np.log(_np_softmax(np.array(STUDENT)))).sum(-1)
    assert distill.item() == pytest.approx(expected.mean(), rel=1e-5)
    total.backward()
    assert torch.isfinite(student.grad).all()


def test_probability_teacher_refuses_mse():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="mse"):
        distillation_per_sample(z, F.softmax(z, -1), "mse", 1.0, teacher_probs=True)
    with pytest.raises(ValueError, match="mse"):
        codistill_loss(z, torch.tensor([0, 1]), F.softmax(z, -1), alpha=1.0, distance="mse", teacher_probs=True)
