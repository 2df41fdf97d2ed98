"""Routing: which specialists are active for an example, and which examples each one runs on."""

from __future__ import annotations

import torch
from torch import Tensor

from specialists.ensemble.membership import GroupMembership
from specialists.ensemble.validation import check_general, check_top_n


def active_specialists(p_general: Tensor, membership: GroupMembership, top_n: int = 1) -> Tensor:
    """``(B, K)`` generalist probabilities -> ``(B, S)`` bool: specialist ``m`` is active for an
    example iff ``S_m`` holds one of the generalist's ``top_n`` classes (ties: ``torch.topk``)."""
    check_general(p_general, membership)
    check_top_n(top_n, membership.num_classes)
    top = p_general.topk(top_n, dim=1).indices  # (B, n)
    class_in_group = membership.dense(p_general.device, torch.bool).T  # (K, S)
    return class_in_group[top].any(dim=1)  # (B, S)


def route(active: Tensor) -> list[Tensor]:
    """``(B, S)`` bool -> per specialist the sorted ``(n_m,)`` long ids of its active examples."""
    if active.dim() != 2 or active.dtype != torch.bool:
        raise ValueError(f"active must be a 2-D bool tensor (B, S), got {active.dtype} {tuple(active.shape)}")
    pairs = active.T.nonzero()  # (P, 2) [specialist, example], sorted by specialist
    counts = active.sum(dim=0).tolist()
    return list(torch.split(pairs[:, 1], counts))
