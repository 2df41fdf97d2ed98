"""Contrastive representation distillation (CRD, Tian et al. 2020).

Both models' embeddings go through a learned linear head and are L2-normalised to ``d``
dimensions. A memory bank keeps, per slot, a momentum average of each side's normalised
embedding of the examples stored there. For each example of a batch, the other side's memory
entry of the same slot is the positive and ``K`` slots drawn uniformly are the negatives;
the scores ``exp(v . m / tau) / Z`` are classified positive vs noise with NCE (noise
probability ``1 / M`` for a bank of ``M`` slots), once with the student as the anchor and once
with the teacher. ``Z`` is fixed on the first batch to ``mean(exp(v . m / tau)) * M``.

Example ``i`` of the training set lives in slot ``i mod M``. With ``M`` equal to the number of
training examples (the default) every example has its own slot, as in the paper; a smaller
``M`` bounds the bank's memory (``2 * M * d`` floats) at the price of examples sharing slots.
The bank, ``Z`` and the heads are state of the loss module, so a training checkpoint keeps them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.registry import LOSSES

__all__ = ["CRDLoss", "nce_loss"]

_EPS = 1e-7
DEFAULT_NEGATIVES = 4096


def nce_loss(scores: Tensor, memory_size: int) -> Tensor:
    """NCE of ``(B, 1 + K)`` scores (column 0 the positive) against uniform noise ``1 / M``:
    ``-(sum_b log(P_pos / (P_pos + K/M)) + sum_{b,k} log((K/M) / (P_neg + K/M))) / B``."""
    negatives = scores.shape[1] - 1
    noise = negatives / memory_size
    positive = torch.log(scores[:, 0] / (scores[:, 0] + noise + _EPS))
    negative = torch.log(noise / (scores[:, 1:] + noise + _EPS))
    return -(positive.sum() + negative.sum()) / scores.shape[0]


@LOSSES.register("crd")
class CRDLoss(nn.Module):
    """CRD for one layer pair (default: the pooled embeddings); a term that also takes the
    batch's example ids.

    Args:
        student_dim / teacher_dim: flattened feature widths ``D_s`` and ``D_t``.
        num_examples: the training set's size ``N`` (the ids are ``0 .. N - 1``).
        memory_size: bank slots ``M`` (default ``N``); at most ``N``.
        embed_dim: ``d`` of the heads (paper: 128).
        negatives: ``K`` noise slots per example (default ``min(4096, M - 1)``; paper: 16384).
        nce_temperature: ``tau`` (paper: 0.07).
        momentum: bank update ``m <- normalize(momentum * m + (1 - momentum) * v)`` (paper: 0.5).
    """

    default_layers: ClassVar[tuple[str, str]] = ("pool", "pool")
    uses_ids: ClassVar[bool] = True

    def __init__(self, student_dim: int, teacher_dim: int, num_examples: int, *,
                 memory_size: int | None = None, embed_dim: int = 128, negatives: int | None = None,
                 nce_temperature: float = 0.07, momentum: float = 0.5) -> None:
        super().__init__()
        size = num_examples if memory_size is None else int(memory_size)
        _check_bank(size, num_examples, negatives)
        if not nce_temperature > 0 or not 0 <= momentum < 1:
            raise ValueError(f"crd: nce_temperature must be > 0 and momentum in [0, 1), got "
                             f"{nce_temperature!r} and {momentum!r}")
        self.memory_size, self.negatives = size, negatives or min(DEFAULT_NEGATIVES, size - 1)
        self.nce_temperature, self.momentum = float(nce_temperature), float(momentum)
        self.embed_s = nn.Linear(student_dim, embed_dim)
        self.embed_t = nn.Linear(teacher_dim, embed_dim)
        bound = 1.0 / math.sqrt(embed_dim / 3)
        self.register_buffer("memory_s", torch.rand(size, embed_dim) * 2 * bound - bound)
        self.register_buffer("memory_t", torch.rand(size, embed_dim) * 2 * bound - bound)
        self.register_buffer("normalizers", torch.full((2,), -1.0))  # Z_s, Z_t; < 0 = not set yet

    @classmethod
    def sized(cls, layers: Sequence[tuple[str, str]], student: Sequence[torch.Size],
              teacher: Sequence[torch.Size], num_examples: int | None) -> dict[str, int]:
        """Constructor arguments from the probed shapes and the training set's size."""
        if num_examples is None:
            raise ValueError("crd keeps a memory bank over the training set: give num_examples")
        return {"student_dim": math.prod(student[0][1:]), "teacher_dim": math.prod(teacher[0][1:]),
                "num_examples": int(num_examples)}

    def forward(self, student_features: Tensor, teacher_features: Tensor, ids: Tensor,
                contrast_slots: Tensor | None = None) -> Tensor:
        """``(B, ...)``, ``(B, ...)``, ids ``(B,)`` -> scalar; ``contrast_slots (B, 1 + K)``
        (column 0 the positive's slot) replaces the random draw, e.g. in tests.

        Gradient scale: a sum over the ``1 + K`` NCE terms per example, averaged over the batch;
        at ``tau = 0.07`` the scores are sharp, so the loss starts large (about ``K/M`` times its
        number of terms) and its gradient w.r.t. an embedding scales like ``1 / tau``.
        """
        v_s = F.normalize(self.embed_s(student_features.flatten(1)), dim=1)  # (B, d)
        v_t = F.normalize(self.embed_t(teacher_features.detach().flatten(1)), dim=1)
        slots = ids.to(v_s.device).long() % self.memory_size  # (B,)
        if contrast_slots is None:
            contrast_slots = torch.randint(self.memory_size, (slots.shape[0], self.negatives + 1),
                                           device=v_s.device)
            contrast_slots[:, 0] = slots
        scores_s = self._scores(self.memory_t, v_s, contrast_slots, 0)  # student anchors
        scores_t = self._scores(self.memory_s, v_t, contrast_slots, 1)
        loss = nce_loss(scores_s, self.memory_size) + nce_loss(scores_t, self.memory_size)
        if self.training:
            self._update(slots, v_s.detach(), v_t.detach())
        return loss

    def _scores(self, memory: Tensor, anchors: Tensor, slots: Tensor, side: int) -> Tensor:
        """``exp(m . v / tau) / Z``: ``(B, 1 + K)`` for anchors ``(B, d)`` and slots ``(B, 1 + K)``."""
        entries = memory[slots].detach()  # (B, 1 + K, d)
        scores = torch.exp(torch.bmm(entries, anchors.unsqueeze(2)).squeeze(2) / self.nce_temperature)
        if self.normalizers[side] < 0:
            self.normalizers[side] = scores.detach().mean() * self.memory_size
        return scores / float(self.normalizers[side])

    @torch.no_grad()
    def _update(self, slots: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
            mixed = memory[slots] * self.momentum + v * (1 - self.momentum)
            memory[slots] = F.normalize(mixed, dim=1)

    def extra_repr(self) -> str:
        return (f"memory_size={self.memory_size}, negatives={self.negatives}, "
                f"nce_temperature={self.nce_temperature}, momentum={self.momentum}")


def _check_bank(size: int, num_examples: int, negatives: int | None) -> None:
    if size > num_examples:
        raise ValueError(f"crd: memory_size={size} is larger than the training set ({num_examples} "
                         f"examples): the bank has one slot per example at most; use memory_size <= "
                         f"{num_examples} (or leave it unset for one slot per example)")
    if size < 2:
        raise ValueError(f"crd: memory_size must be at least 2, got {size}")
    if negatives is not None and not 1 <= negatives < size:
        raise ValueError(f"crd: negatives={negatives} must lie in [1, memory_size - 1 = {size - 1}]")
