"""The ensemble as a teacher: its combined distribution ``q`` softened to temperature ``T``,
``softmax(log q / T)`` (:func:`distill.targets.soft_targets`: exact zeros of ``q`` stay zero),
for a batch of any size."""

from __future__ import annotations

import torch
from torch import Tensor

from distill.targets import check_temperature, soft_targets
from specialists.ensemble.routed_ensemble import RoutedEnsemble, ensemble_forward


@torch.no_grad()
def ensemble_soft_targets(ensemble: RoutedEnsemble, x: Tensor, temperature: float = 1.0, *,
                          batch_size: int = 512) -> Tensor:
    """``x (N, C, H, W)`` float in [0, 1] -> ``(N, K)`` soft targets in the ensemble's dtype, on
    the CPU; ``x`` goes through the ensemble ``batch_size`` examples at a time on the device of
    its models. ``T = 1`` gives ``q`` itself (renormalised).

    Raises ``ValueError`` for a temperature that is not a positive finite number (before any
    model runs) and when a model emits probabilities that are not finite or do not sum to 1.
    """
    temperature = check_temperature(temperature)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(x) == 0:
        return torch.zeros(0, ensemble.membership.num_classes, dtype=ensemble.dtype)
    device = next(ensemble.generalist.parameters()).device
    parts = [soft_targets(ensemble_forward(ensemble, x[i:i + batch_size].to(device)).q, temperature).cpu()
             for i in range(0, len(x), batch_size)]
    return torch.cat(parts)  # (N, K)
