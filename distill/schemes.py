"""Pure pieces of the training schemes that are more than "a student learns from a teacher".

* Deep mutual learning (DML, Zhang et al. 2018): a group of ``M >= 2`` students trained
  together, each on its cross-entropy plus the mean KL divergence from the others' predictions
  to its own, ``L_i = CE(z_i, y) + T^2 / (M - 1) * sum_{j != i} KL(p_j^T || p_i^T)``. The others'
  predictions are detached, so one step that minimises ``sum_i L_i`` updates every student on
  its own loss (the paper's Algorithm 1 re-runs the forward pass between the students' updates;
  updating all on the same batch's predictions is the common implementation).
* Born-again networks and teacher assistants are chains of ordinary distillations (each
  generation, or the assistant, teaches the next model with :class:`distill.train.DistillObjective`);
  :func:`assistant_width` places the assistant between student and teacher.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.targets import check_temperature

__all__ = ["MutualGroup", "assistant_width", "mutual_learning_loss", "mutual_one_epoch"]


def mutual_learning_loss(logits: Tensor, labels: Tensor, *, temperature: float = 1.0
                         ) -> tuple[Tensor, dict[str, Tensor]]:
    """The summed DML loss of a group and each member's terms.

    Args:
        logits: ``(M, B, K)`` the M students' logits on one batch, ``M >= 2``.
        labels: ``(B,)`` int64 classes.
        temperature: ``T > 0`` of the KL terms (the paper: 1).

    Returns:
        ``(sum_i L_i, terms)`` with ``terms["ce_<i>"]`` and ``terms["kl_<i>"]`` (``T^2`` * the mean
        KL of member ``i``, 1-based), detached. Gradient scale: member ``i``'s gradient is that
        of its own CE plus a mean (not a sum) over its peers, so it does not grow with ``M``; the
        ``T^2`` factor keeps the KL part's size independent of T, as in KD.
    """
    check_temperature(temperature)
    if logits.dim() != 3 or logits.shape[0] < 2:
        raise ValueError(f"mutual learning needs the logits of at least 2 students as (M, B, K), got "
                         f"{tuple(logits.shape)}; a group of one has no one to learn from")
    logits = logits.float()
    log_p = F.log_softmax(logits / temperature, dim=2)  # (M, B, K)
    peers = log_p.detach()
    members = logits.shape[0]
    total = logits.new_zeros(())
    terms: dict[str, Tensor] = {}
    for i in range(members):
        ce = F.cross_entropy(logits[i], labels)
        kl = sum(F.kl_div(log_p[i], peers[j], log_target=True, reduction="batchmean")
                 for j in range(members) if j != i) / (members - 1) * temperature**2
        total = total + ce + kl
        terms[f"ce_{i + 1}"], terms[f"kl_{i + 1}"] = ce.detach(), kl.detach()
    return total, terms


class MutualGroup(nn.Module):
    """``M`` students trained together; ``forward(x) -> (M, B, K)`` their stacked logits."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"a mutual-learning group needs at least 2 students, got {len(members)}")
        self.members = nn.ModuleList(members)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(M, B, K)``."""
        return torch.stack([member(x) for member in self.members])


def mutual_one_epoch(group: MutualGroup, batches: Iterable[tuple[Tensor, Tensor]],
                     optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler | None,
                     *, temperature: float = 1.0,
                     on_step: Callable[[int, float], None] | None = None) -> dict[str, float]:
    """One pass of the group over ``(x (B, C, H, W), y (B,))`` batches (already on its device).

    Returns the example-weighted means of the loss and of each member's terms, and each
    member's training top-1 (``acc_<i>``). ValueError on a non-finite loss (before the step).
    """
    group.train()
    sums: dict[str, float] = {}
    examples = 0
    for step, (x, y) in enumerate(batches):
        logits = group(x)  # (M, B, K)
        loss, terms = mutual_learning_loss(logits, y, temperature=temperature)
        value = float(loss.detach())
        if not torch.isfinite(loss):
            raise ValueError(f"mutual learning: non-finite loss {value} at step {step}; lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        batch = y.shape[0]
        hits = (logits.detach().argmax(dim=2) == y).float().sum(dim=1)  # (M,)
        for name, v in {"loss": value, **{k: float(t) for k, t in terms.items()},
                        **{f"acc_{i + 1}": float(h) / batch for i, h in enumerate(hits)}}.items():
            sums[name] = sums.get(name, 0.0) + v * batch
        examples += batch
        if on_step is not None:
            on_step(step, value)
    if examples == 0:
        raise ValueError("mutual learning: the epoch had no batches")
    return {name: total / examples for name, total in sums.items()}


def assistant_width(student_width: float, teacher_width: float, width: float | None = None) -> float:
    """The teacher assistant's width multiplier: ``width`` if given, else the midpoint of the
    student's and the teacher's. ValueError unless it lies strictly between them."""
    chosen = (student_width + teacher_width) / 2 if width is None else float(width)
    low, high = sorted((student_width, teacher_width))
    if not low < chosen < high:
        raise ValueError(f"the teacher assistant's width {chosen} must lie strictly between the student's "
                         f"({student_width}) and the teacher's ({teacher_width}); set "
                         "distill.schemes.assistant_width inside that range")
    return chosen
