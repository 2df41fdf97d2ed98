"""Pure training helpers for one specialist (DESIGN §2.2). No file I/O, no logging.

- :func:`sampled_batches` turns a :class:`~specialists.sampler.HalfAndHalfBatchSampler` into
  ``(x, y)`` batches with specialist targets (group position, or the dustbin index).
- :func:`balanced_holdout` picks the examples a specialist early-stops on: every holdout
  example of its group plus as many drawn uniformly from the rest, i.e. the same 50/50 mix it
  is trained on (the whole holdout would be dominated by the dustbin and cost K/|S_m| times
  more per epoch).
- :func:`evaluate_specialist` reports the loss and accuracy on such a holdout, and the
  prior-free ``group_top1``: accuracy among the group's classes only, on in-group examples
  (the dustbin correction does not change it, so it compares directly with the generalist).
- :func:`init_invariant_maxdiff` measures how exactly an untrained specialist reproduces the
  generalist's probabilities collapsed onto (group classes, dustbin).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from specialists.model import Specialist, collapse_probs, validate_group
from specialists.sampler import HalfAndHalfBatchSampler, in_group_mask

__all__ = [
    "SoftTargetLoss",
    "balanced_holdout",
    "evaluate_specialist",
    "init_invariant_maxdiff",
    "sampled_batches",
]


def _to_float(images: Tensor) -> Tensor:
    """uint8 images in [0, 255] -> float32 in [0, 1]; floating images are taken as is."""
    return images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()


def sampled_batches(images: Tensor, targets: Tensor, sampler: HalfAndHalfBatchSampler, *,
                    device: str | torch.device = "cpu") -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x (B, C, H, W) float32 in [0, 1], y (B,) int64)`` for the sampler's batches.

    Args:
        images: ``(N, C, H, W)`` training images (uint8, or floating in [0, 1]).
        targets: ``(N,)`` specialist targets, e.g. ``specialist_targets(labels, group)``.
        sampler: yields lists of indices into ``images`` (call ``set_epoch`` first).
    """
    if images.shape[0] != targets.shape[0]:
        raise ValueError(f"images ({images.shape[0]}) and targets ({targets.shape[0]}) must "
                         "have one entry per training example")
    dev = torch.device(device)
    for batch in sampler:
        index = torch.as_tensor(batch, dtype=torch.long)
        yield _to_float(images[index].to(dev)), targets[index].to(dev)


def balanced_holdout(labels: Tensor, group: Sequence[int], *, seed: int) -> Tensor:
    """Indices ``(M,)`` into ``labels``: every in-group example, then an equal number (or all,
    if fewer) drawn uniformly without replacement from the out-of-group ones.

    Deterministic given ``seed``. Raises ValueError when no example is in the group.
    """
    mask = in_group_mask(labels, validate_group(group)).cpu().numpy()
    inside, outside = np.flatnonzero(mask), np.flatnonzero(~mask)
    if len(inside) == 0:
        raise ValueError(f"no holdout example has a label in group {tuple(group)}; the "
                         "specialist cannot be early-stopped: raise the holdout size")
    rng = np.random.default_rng([seed, len(labels)])
    picked = rng.choice(outside, size=min(len(inside), len(outside)), replace=False)
    return torch.from_numpy(np.concatenate([inside, np.sort(picked)])).long()


@torch.no_grad()
def evaluate_specialist(model: nn.Module, images: Tensor, targets: Tensor, *,
                        dustbin_index: int, batch_size: int = 512,
                        device: str | torch.device = "cpu") -> dict[str, float]:
    """Mean cross-entropy and accuracy of specialist logits ``(B, |S_m| + 1)``.

    Args:
        model: maps ``(B, C, H, W)`` in [0, 1] to ``(B, |S_m| + 1)`` logits, dustbin last.
        images: ``(M, C, H, W)``; targets: ``(M,)`` specialist targets.
        dustbin_index: ``|S_m|``.

    Returns:
        ``loss``, ``top1`` (over group classes + dustbin), ``group_top1`` (in-group examples,
        argmax over the group's logits only; NaN without in-group examples), ``examples``.
    """
    if len(targets) == 0:
        raise ValueError("no holdout examples to evaluate the specialist on")
    dev = torch.device(device)
    was_training = model.training
    model.eval()
    loss_sum, hits, group_hits, group_count = 0.0, 0, 0, 0
    try:
        for start in range(0, len(targets), batch_size):
            x = _to_float(images[start:start + batch_size].to(dev))
            y = targets[start:start + batch_size].to(dev)
            logits = model(x).float()  # (B, |S_m| + 1)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            hits += int((logits.argmax(1) == y).sum())
            inside = y != dustbin_index
            group_pred = logits[inside, :dustbin_index].argmax(1)  # (B_in,)
            group_hits += int((group_pred == y[inside]).sum())
            group_count += int(inside.sum())
    finally:
        model.train(was_training)
    n = len(targets)
    return {
        "loss": loss_sum / n,
        "top1": hits / n,
        "group_top1": group_hits / group_count if group_count else float("nan"),
        "examples": float(n),
    }


def generalist_targets(generalist_logits: Tensor, group: Sequence[int], *, temperature: float,
                       dustbin_shift: float) -> Tensor:
    """The generalist's distribution at ``temperature`` collapsed onto (group classes, dustbin),
    in the specialist's training mix: ``(B, |S_m| + 1)``, rows summing to 1.

    ``dustbin_shift`` is minus :func:`specialists.prior.dustbin_log_correction`: the log-odds by
    which the half-and-half batches under-represent the dustbin relative to the data, so the
    targets agree with the hard labels' mix (the specialist is prior-corrected after training).
    """
    collapsed = collapse_probs(torch.softmax(generalist_logits.float() / temperature, dim=1), group)
    logits = collapsed.clamp_min(torch.finfo(torch.float32).tiny).log()  # (B, |S_m| + 1)
    logits[:, -1] += dustbin_shift
    return torch.softmax(logits, dim=1)


class SoftTargetLoss:
    """``(1 - w) * CE(z, y) + w * T^2 * KL(targets || softmax(z / T))`` for a specialist, the soft
    targets those of its frozen generalist on the same batch (paper section 6: soft targets keep a
    specialist trained on few examples from overfitting). Call ``set_batch(x)`` before each step
    (``train_one_epoch``'s ``loss_fn`` receives logits and labels only)."""

    def __init__(self, generalist: nn.Module, group: Sequence[int], *, weight: float, temperature: float,
                 dustbin_shift: float) -> None:
        if not 0 < weight <= 1:
            raise ValueError(f"the soft-target weight must lie in (0, 1], got {weight}")
        self.generalist, self.group = generalist.eval(), tuple(group)
        self.weight, self.temperature, self.dustbin_shift = weight, temperature, dustbin_shift
        self._targets: Tensor | None = None

    @torch.no_grad()
    def set_batch(self, x: Tensor) -> None:
        self._targets = generalist_targets(self.generalist(x), self.group, temperature=self.temperature,
                                           dustbin_shift=self.dustbin_shift)

    def __call__(self, logits: Tensor, y: Tensor) -> Tensor:
        if self._targets is None:
            raise RuntimeError("call set_batch(x) with the batch before computing the loss")
        t = self.temperature
        soft = F.kl_div(F.log_softmax(logits / t, dim=1), self._targets, reduction="batchmean") * t * t
        return (1 - self.weight) * F.cross_entropy(logits, y) + self.weight * soft


@torch.no_grad()
def init_invariant_maxdiff(generalist: nn.Module, specialist: Specialist, images: Tensor) -> float:
    """``max |softmax(specialist(x)) - collapse_probs(softmax(generalist(x)), group)|``.

    ``images``: ``(B, C, H, W)``. Both models are evaluated in eval mode (training flags are
    restored). An untrained specialist gives float rounding only (<= ~1e-6 in float32).
    """
    flags = generalist.training, specialist.training
    generalist.eval()
    specialist.eval()
    try:
        device = next(specialist.parameters()).device
        x = _to_float(images.to(device))
        expected = collapse_probs(torch.softmax(generalist.to(device)(x).double(), 1),
                                  specialist.group)  # (B, |S_m| + 1)
        got = torch.softmax(specialist(x).double(), 1)
        return float((got - expected).abs().max())
    finally:
        generalist.train(flags[0])
        specialist.train(flags[1])
