"""The codistillation loss: pure functions of tensors, no Ray, no state.

    loss_i = CE(y, z_i) + alpha(t) * D(z_i, teacher)

where the teacher comes from the peers' (possibly stale) predictions by `codistill.teacher_rule`:
logits (the mean of the peers' logits, or one peer's) or, for ``mean_probs``, probabilities (the
mean of the peers' softmaxes at the temperature, ``teacher_probs=True`` below); D is ``kl`` or
``mse`` (logits only) and alpha(t) follows a burn-in and an optional linear ramp. Everything the
training loop needs to turn logits, labels and a (masked) teacher into a scalar to backpropagate
lives here, so it can be checked against hand computations without starting anything.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DISTANCES = ("kl", "mse")


def alpha_at(step: int, alpha: float, burn_in: int, ramp_steps: int) -> float:
    """Distillation weight at optimizer step ``step`` (0-based).

    0 while ``step < burn_in``; then rises linearly from 0 (at ``step == burn_in``) to ``alpha``
    (at ``step == burn_in + ramp_steps``) and stays there. ``ramp_steps == 0`` switches to
    ``alpha`` at once.
    """
    if burn_in < 0 or ramp_steps < 0:
        raise ValueError(f"burn_in and ramp_steps must be >= 0, got {burn_in} and {ramp_steps}")
    # Early predictions are close to uniform noise; distilling from them only slows every replica
    # down, hence the burn-in (Anil et al. 2018 and the reference study both use one).
    if step < burn_in:
        return 0.0
    if ramp_steps == 0:
        return float(alpha)
    # A ramp avoids a sudden jump in the loss scale when the teacher term switches on.
    return float(alpha) * min(1.0, (step - burn_in) / ramp_steps)


def distillation_per_sample(
    student_logits: Tensor, teacher_logits: Tensor, distance: str, temperature: float,
    student_log_probs: Tensor | None = None, teacher_probs: bool = False,
) -> Tensor:
    """Per-sample distance between student logits and the teacher, shape [B].

    - ``kl``: KL(teacher || student) between softmax(teacher / T) and softmax(student / T), summed
      over classes and multiplied by T^2. With ``teacher_probs`` the teacher is that distribution
      already (the ``mean_probs`` rule: the mean of the peers' softmax(z_j / T)), used as it is.
    - ``mse``: mean over classes of (student - teacher)^2 on the raw logits (T is ignored); it has
      no meaning for a probability teacher, which is refused.

    The teacher is detached here, whatever the caller did, and cast to the student's dtype (the
    broker ships float16 logits or probabilities). ``student_log_probs``, if given, is
    log_softmax(student_logits) computed already (`codistill_loss` has it from the
    cross-entropy); ``kl`` with T = 1 uses it instead of computing it again.
    """
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; expected one of {DISTANCES}")
    if teacher_probs and distance != "kl":
        raise ValueError(f"a probability teacher needs distance 'kl', got {distance!r} (mse compares logits)")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits differ in shape: "
            f"{tuple(student_logits.shape)} vs {tuple(teacher_logits.shape)}"
        )
    # A teacher that carries a graph would push gradient into the peer's copy (a bug seen in
    # public codistillation code); detaching here makes that impossible for every caller.
    teacher = teacher_logits.detach().to(device=student_logits.device, dtype=student_logits.dtype)
    if distance == "mse":
        return (student_logits - teacher).pow(2).mean(dim=-1)

    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = float(temperature)
    # At T = 1 the divisions and the T^2 scaling are skipped: the same numbers, fewer small ops (on
    # a small model each op of the loss is a visible share of a step, see benchmarks/overhead.py).
    if t == 1.0:
        log_p = F.log_softmax(student_logits, dim=-1) if student_log_probs is None else student_log_probs
    else:
        log_p = F.log_softmax(student_logits / t, dim=-1)
    # F.kl_div(input, target) computes KL(target || input): the student goes first. Swapping the
    # arguments (the classic mistake) gives the mode-seeking direction instead.
    if teacher_probs:
        # probabilities as target: kl_div takes q log q as 0 where q is 0 (a float16 probability
        # below 6e-8 is 0), where log_target would give 0 * -inf = NaN
        kl = F.kl_div(log_p, teacher, reduction="none").sum(dim=-1)
    else:
        # log_target=True keeps both sides in log space, which is stable for very confident teachers
        log_q = F.log_softmax(teacher if t == 1.0 else teacher / t, dim=-1)
        kl = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(dim=-1)
    # Gradients of the softened KL scale as 1/T^2; multiplying back keeps alpha's meaning
    # independent of the temperature (Hinton et al. 2015).
    return kl if t == 1.0 else kl * (t * t)


def codistill_loss(
    logits: Tensor,
    targets: Tensor,
    teacher_logits: Tensor | None = None,
    mask: Tensor | None = None,
    alpha: float = 0.0,
    distance: str = "kl",
    temperature: float = 1.0,
    teacher_probs: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(total, ce, distill)``, three scalar tensors, with ``total = ce + alpha * distill``.

    - ``ce`` is the mean cross-entropy over the batch.
    - ``distill`` is the sum over samples with a teacher (``mask`` True) of the per-sample distance,
      divided by the full batch size B, not by the number of samples with a teacher. Masked samples
      contribute nothing (no value, no gradient), and the term therefore shrinks when few samples
      have a teacher: a batch with half its teachers missing distils half as hard. This keeps one
      sample's weight fixed whatever the hit rate.
    - With ``teacher_logits`` None or ``alpha == 0``, ``distill`` is a zero tensor and ``total`` is
      exactly ``ce``.

    ``mask`` is a bool tensor [B]; None means every sample has a teacher. Teacher rows under a
    False mask may hold anything, NaN included: they are never read. ``teacher_probs``: the
    teacher holds probabilities at ``temperature``, not logits (`distillation_per_sample`).

    A language model's ``logits`` and teacher are [B, T, V] and its targets [B, T]: every token is
    a row of the classifier's loss (``ce`` the mean over the B x T tokens, ``distill`` the sum
    over the tokens of samples with a teacher divided by B x T), and ``mask`` [B] is per sample
    (a window's teacher is there for all its tokens or for none).
    """
    if logits.dim() == 3:
        logits, targets, teacher_logits, mask = _per_token(logits, targets, teacher_logits, mask)
    if teacher_logits is None or alpha == 0:
        ce = F.cross_entropy(logits, targets)
        # Return ce itself, not ce + 0 * distill: alpha == 0 must be plain cross-entropy, bit for
        # bit, and must not depend on teacher values that may be NaN.
        return ce, ce, ce.new_zeros(())

    # F.cross_entropy is nll_loss of log_softmax (the same numbers); computed here, the student's
    # log-softmax serves the KL term too: one log-softmax and its backward less per step.
    log_p = F.log_softmax(logits, dim=-1)
    ce = F.nll_loss(log_p, targets)
    batch = logits.shape[0]
    if mask is None:
        student, teacher, student_log_p = logits, teacher_logits, log_p
    else:
        _check_mask(mask, batch)
        # Index rather than multiply by the mask: a NaN teacher row times 0 is still NaN, and it
        # would poison both the loss and the gradient.
        mask = mask.to(logits.device)
        student, teacher = logits[mask], teacher_logits[mask.to(teacher_logits.device)]
        student_log_p = log_p[mask]
    per_sample = distillation_per_sample(student, teacher, distance, temperature, student_log_p, teacher_probs)
    # Sum of an empty selection is 0, so a batch with no teacher at all gives distill == 0.
    distill = per_sample.sum() / batch
    return ce + alpha * distill, ce, distill


def _per_token(logits: Tensor, targets: Tensor, teacher: Tensor | None, mask: Tensor | None):
    """[B, T, V] outputs as B x T rows of [V], and a per-sample mask as one per token."""
    batch, tokens = logits.shape[:2]
    if mask is not None:
        _check_mask(mask, batch)
        mask = mask.repeat_interleave(tokens)
    if teacher is not None:
        if teacher.shape != logits.shape:
            raise ValueError(f"student and teacher logits differ in shape: "
                             f"{tuple(logits.shape)} vs {tuple(teacher.shape)}")
        teacher = teacher.flatten(0, 1)
    return logits.flatten(0, 1), targets.flatten(), teacher, mask


def _check_mask(mask: Tensor, batch: int) -> None:
    if mask.dtype != torch.bool or mask.shape != (batch,):
        raise ValueError(f"mask must be a bool tensor of shape ({batch},), got {mask.dtype} {tuple(mask.shape)}")
