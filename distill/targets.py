"""Soft targets from a teacher distribution: the one implementation of ``softmax(log q / T)``
and of completing a top-k distribution.

Zero-probability policy (the same everywhere: the ensemble API, the soft-target cache, the KD
loss): an exact zero in ``q`` stays an exact zero at every temperature. ``softmax(log q / T)``
is ``q ** (1 / T)`` renormalised, and ``0 ** (1 / T) = 0``; clamping zeros to a tiny floor
instead would hand them ``floor ** (1 / T)`` of mass, which at ``T = 10`` is ~1e-4 per class
(float32) and swamps the real tail of a large-K distribution. Every row must hold some mass.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["check_temperature", "complete_topk", "log_soft_targets", "soft_targets"]


def check_temperature(temperature: object) -> float:
    """``temperature`` as a float; ValueError unless it is a positive finite number."""
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) \
            or not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}; "
                         "pass e.g. temperature=4.0 (T=1 means no softening)")
    return float(temperature)


def log_soft_targets(q: Tensor, temperature: float) -> Tensor:
    """``(B, K)`` ``log softmax(log q / T)`` of probabilities ``q (B, K)``; ``-inf`` where ``q == 0``.

    Half-precision ``q`` is computed in float32; other dtypes are kept.
    """
    temperature = check_temperature(temperature)
    if q.dim() != 2:
        raise ValueError(f"q must have shape (B, K), got {tuple(q.shape)}")
    if q.dtype in (torch.float16, torch.bfloat16):
        q = q.float()
    if q.numel() and bool((q < 0).any()):
        raise ValueError(f"q must be probabilities (non-negative), got min {q.min().item():.4g}")
    if q.numel() and bool((q.sum(dim=-1) <= 0).any()):
        raise ValueError("every row of q must hold some probability mass; got a row of zeros")
    return torch.log_softmax(torch.log(q) / temperature, dim=-1)


def soft_targets(q: Tensor, temperature: float) -> Tensor:
    """``(B, K)`` ``softmax(log q / T)``: the teacher's distribution at temperature ``T``
    (``T = 1`` returns ``q`` renormalised; exact zeros stay zero)."""
    return log_soft_targets(q, temperature).exp()


def complete_topk(values: Tensor, ids: Tensor, num_classes: int, residual: Tensor | None = None) -> Tensor:
    """Full ``(B, K)`` distribution from the ``k`` largest probabilities of each row.

    Args:
        values: ``(B, k)`` kept probabilities (non-negative).
        ids: ``(B, k)`` integer class ids of ``values``.
        num_classes: ``K >= k``.
        residual: ``(B,)`` mass of the ``K - k`` classes not kept; default ``1 - values.sum(-1)``
            (clamped at 0).

    Returns:
        ``(B, K)`` probabilities (float32 for half inputs): the kept values at their ids and the
        residual spread uniformly over the other ``K - k`` classes (the maximum-entropy completion
        with the right total mass). A zero residual leaves those classes at exactly zero.
    """
    if values.dim() != 2 or values.shape != ids.shape:
        raise ValueError(f"values and ids must both have shape (B, k), got {tuple(values.shape)} "
                         f"and {tuple(ids.shape)}")
    if ids.is_floating_point():
        raise ValueError(f"ids must be integer class ids, got dtype {ids.dtype}")
    k = values.shape[1]
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < k:
        raise ValueError(f"num_classes must be an int >= k={k} (the number of kept entries), "
                         f"got {num_classes!r}")
    if values.dtype in (torch.float16, torch.bfloat16):
        values = values.float()
    if residual is None:
        residual = (1.0 - values.sum(dim=-1)).clamp_min(0.0)
    elif residual.shape != values.shape[:1]:
        raise ValueError(f"residual must have shape (B,)={tuple(values.shape[:1])}, "
                         f"got {tuple(residual.shape)}")
    rest = num_classes - k
    fill = residual.to(values.dtype) / rest if rest > 0 else values.new_zeros(values.shape[0])
    probs = fill.unsqueeze(1).expand(-1, num_classes).clone()
    return probs.scatter(1, ids.long(), values)
