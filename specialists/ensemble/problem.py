"""The combination problem (Hinton et al. 2015, eq. 5) in batched form, for the fixed-point solver.

Minimise ``F(q) = KL(p^g || q) + sum_{m in A} KL(p^m || q~^m)`` over distributions ``q``.
Up to a constant, ``F(q) = -sum_j b_j log q_j - sum_{m in A} d_m log Q_m`` with

* ``b_j = p^g_j + sum_{m in A, j in S_m} p^m_j``   (generalist + in-group specialist mass)
* ``d_m = p^m_dust`` and ``Q_m = sum_{j not in S_m} q_j`` (mass outside group ``m``).

The EM / minorise-maximise step is ``q_j <- (b_j + q_j * t_j) / (1 + a)`` with
``t_j = sum_{m in A, j not in S_m} d_m / Q_m``; we divide by ``sum_j w_j`` (equal to ``1 + a``
in exact arithmetic) so every iterate stays on the simplex.

The active (example, specialist) pairs are kept as a flat list of ``P`` pairs. Two layouts of
one problem (``n`` coordinates per row):

* dense: all ``K`` classes, one shared ``(S, K)`` complement-membership matrix (two
  ``(R, K) x (K, S)`` products per step);
* sparse ("lumped"): per row only the classes of the active groups (their union ``U``) plus one
  *lump* coordinate for every class outside ``U``. Those classes have ``b_j = p^g_j`` and
  ``t_j = sum_m d_m / Q_m`` for all of them, so both the EM iterates started at ``p^g`` and the
  optimum stay proportional to ``p^g`` there; solving for their total mass is exact and costs
  ``O(a |U|)`` per row instead of ``O(K S)``; one ``(n,)`` complement mask per pair.

Complement masses are always sums of non-negative terms (never ``1 - in_group``), so tiny
``Q_m`` are computed to full relative precision.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from specialists.ensemble.membership import GroupMembership, SpecialistOutput
from specialists.ensemble.validation import normalized


@dataclass(frozen=True)
class Problem:
    """``R`` rows of the problem in ``n`` coordinates with ``P`` active (row, specialist) pairs,
    sorted by row; every row has at least one pair."""

    b: Tensor  # (R, n) generalist + in-group specialist mass, 0 on padding coordinates
    valid: Tensor  # (R, n) bool, coordinate is a real class (or a non-empty lump)
    general: Tensor  # (R, n) generalist distribution in these coordinates
    const: Tensor  # (R,) entropies, so that objective(q) == F(q)
    pair_row: Tensor  # (P,) long, row of each pair
    dust: Tensor  # (P,) dustbin probability d_m of each pair
    outside: Tensor  # dense: (S, n) shared; sparse: (P, n) per pair. 1 iff coordinate not in group
    pair_group: Tensor | None  # dense only: (P,) long specialist of each pair

    def take(self, keep: Tensor) -> Problem:
        """The sub-problem of the rows where the ``(R,)`` bool ``keep`` is set."""
        keep_pair = keep[self.pair_row]
        renumber = keep.long().cumsum(0) - 1
        return Problem(
            self.b[keep], self.valid[keep], self.general[keep], self.const[keep],
            renumber[self.pair_row[keep_pair]], self.dust[keep_pair],
            self.outside if self.pair_group is not None else self.outside[keep_pair],
            None if self.pair_group is None else self.pair_group[keep_pair],
        )

    def outside_mass(self, q: Tensor) -> Tensor:
        """``(R, n)`` -> ``(P,)`` ``Q_m = sum_{j not in S_m} q_j`` of every pair."""
        if self.pair_group is not None:
            return (q @ self.outside.T)[self.pair_row, self.pair_group]
        return (q[self.pair_row] * self.outside).sum(dim=1)

    def spread(self, ratio: Tensor) -> Tensor:
        """``(P,)`` ``r_m = d_m / Q_m`` -> ``(R, n)`` ``t_j = sum_{m: j not in S_m} r_m``."""
        rows = self.b.shape[0]
        if self.pair_group is not None:
            per_group = ratio.new_zeros(rows, self.outside.shape[0])
            per_group[self.pair_row, self.pair_group] = ratio
            return per_group @ self.outside
        return ratio.new_zeros(rows, self.b.shape[1]).index_add_(0, self.pair_row, ratio.unsqueeze(1) * self.outside)

    def initial(self) -> Tensor:
        """``(R, n)`` starting point: the generalist, nudged off zero so every ``Q_m > 0``."""
        nudge = torch.finfo(self.b.dtype).tiny ** 0.5
        q = torch.where(self.valid, self.general + nudge, torch.zeros_like(self.general))
        return q / q.sum(dim=1, keepdim=True)


def em_step(problem: Problem, q: Tensor) -> tuple[Tensor, Tensor]:
    """One EM step. ``q (R, n)`` -> ``(q_new (R, n), Q (P,) at q)``."""
    mass = problem.outside_mass(q)
    ratio = problem.dust / mass.clamp_min(torch.finfo(q.dtype).tiny)
    w = problem.b + q * problem.spread(ratio)
    return w / w.sum(dim=1, keepdim=True), mass


def objective(problem: Problem, q: Tensor, mass: Tensor | None = None) -> Tensor:
    """``F`` at ``q (R, n)`` -> ``(R,)`` (``mass`` ``(P,)``: ``Q`` at ``q`` if already known)."""
    if mass is None:
        mass = problem.outside_mass(q)
    cross = torch.xlogy(problem.b, q).sum(dim=1).index_add(0, problem.pair_row, torch.xlogy(problem.dust, mass))
    return problem.const - cross


# ------------------------------------------------------------------------------ construction


@dataclass(frozen=True)
class Pairs:
    """Active (example, specialist) pairs of ``R`` rows, row-major; ``P`` pairs."""

    row: Tensor  # (P,) row of the pair
    group: Tensor  # (P,) specialist id
    in_group: Tensor  # (P, max L) specialist probabilities of the group's classes, 0-padded
    dust: Tensor  # (P,) dustbin probability
    entropy: Tensor  # (P,) sum_k p^m_k log p^m_k


def gather_pairs(
    active: Tensor,
    rows: Tensor,
    batch: int,
    specialist_probs: Sequence[SpecialistOutput],
    membership: GroupMembership,
    dtype: torch.dtype,
) -> Pairs:
    """Active pairs of the selected rows. ``active (R, S)`` bool is the mask of those rows,
    ``rows (R,)`` their ids in the full batch of ``batch`` examples (which the
    ``specialist_probs`` indices refer to)."""
    device = active.device
    row, group = active.nonzero().unbind(1)
    width = max(membership.sizes, default=0)
    locate = torch.full((membership.num_groups, batch), -1, dtype=torch.long, device=device)
    in_group, dust, entropy, offset = [], [], [], 0
    for m, (index, probs) in enumerate(specialist_probs):
        index = index.to(device=device, dtype=torch.long)
        locate[m, index] = torch.arange(offset, offset + index.numel(), device=device)
        p = normalized(probs, dtype, device)
        in_group.append(F.pad(p[:, :-1], (0, width - p.shape[1] + 1)))
        dust.append(p[:, -1])
        entropy.append(torch.xlogy(p, p).sum(dim=1))
        offset += index.numel()
    where = locate[group, rows[row]]
    return Pairs(
        row, group,
        torch.cat(in_group)[where], torch.cat(dust)[where], torch.cat(entropy)[where],
    )


def _entries(pairs: Pairs, membership: GroupMembership) -> tuple[Tensor, Tensor, Tensor]:
    """Flatten the pairs' group classes: ``(pair (E,), position in group (E,), class (E,))``."""
    classes = membership.padded_groups(pairs.row.device)[pairs.group]  # (P, max L)
    pair, pos = (classes >= 0).nonzero().unbind(1)
    return pair, pos, classes[pair, pos]


def _row_entropy(pairs: Pairs, general: Tensor) -> Tensor:
    """``(R,)`` sum of the generalist's and the active specialists' ``sum p log p``."""
    const = torch.xlogy(general, general).sum(dim=1)
    return const.index_add(0, pairs.row, pairs.entropy)


def build_dense(general: Tensor, pairs: Pairs, membership: GroupMembership) -> Problem:
    """Dense layout over all ``K`` classes. ``general (R, K)`` normalised generalist."""
    rows, _ = general.shape
    pair, pos, cls = _entries(pairs, membership)
    b = general.index_put((pairs.row[pair], cls), pairs.in_group[pair, pos], accumulate=True)
    outside = 1 - membership.dense(general.device, general.dtype)
    valid = torch.ones_like(general, dtype=torch.bool)
    const = _row_entropy(pairs, general)
    return Problem(b, valid, general, const, pairs.row, pairs.dust, outside, pairs.group)


@dataclass(frozen=True)
class Lumping:
    """How the sparse layout of rows ``rows`` maps back to all ``K`` classes. Union entries are
    listed row by row: entry ``e`` is class ``cls[e]`` of local row ``row[e]``, at coordinate
    ``pos[e]``; coordinate ``n - 1`` of every row is the lump."""

    rows: Tensor  # (R,) long, rows of the full batch that were solved
    row: Tensor  # (N,) long, local row of each union entry
    cls: Tensor  # (N,) long, class id of each union entry
    pos: Tensor  # (N,) long, coordinate of each union entry
    outside_raw: Tensor  # (R,) un-normalised generalist mass outside the union


def build_sparse(
    p_general: Tensor, rows: Tensor, pairs: Pairs, membership: GroupMembership
) -> tuple[Problem, Lumping]:
    """Lumped layout of rows ``rows (R,)`` of ``p_general (B, K)`` (any row sums near 1; the
    problem sees them normalised): per row the union of its active groups, then one lump."""
    num_rows, device = rows.numel(), p_general.device
    num_classes = p_general.shape[1]
    pair, pos, cls = _entries(pairs, membership)
    entry_row = pairs.row[pair]
    keys, inverse = torch.unique(entry_row * num_classes + cls, sorted=True, return_inverse=True)
    key_row, key_cls = keys // num_classes, keys % num_classes
    counts = torch.bincount(key_row, minlength=num_rows)
    key_pos = torch.arange(keys.numel(), device=device) - (counts.cumsum(0) - counts)[key_row]
    width = int(counts.max())  # the lump is coordinate `width`
    valid = torch.zeros(num_rows, width + 1, dtype=torch.bool, device=device)
    valid[key_row, key_pos] = True
    valid[:, width] = counts < num_classes
    total = p_general.sum(dim=1)[rows]
    outside_raw = _sum_outside(p_general, rows, key_row, key_cls)
    reduced = p_general.new_zeros(num_rows, width + 1)
    reduced[key_row, key_pos] = p_general[rows[key_row], key_cls]
    reduced[:, width] = outside_raw
    reduced /= total.unsqueeze(1)
    entry_pos = key_pos[inverse]
    b = reduced.index_put((entry_row, entry_pos), pairs.in_group[pair, pos], accumulate=True)
    outside = valid[pairs.row].to(p_general.dtype)  # (P, n)
    outside[pair, entry_pos] = 0
    const = _row_entropy(pairs, reduced)
    problem = Problem(b, valid, reduced, const, pairs.row, pairs.dust, outside, None)
    return problem, Lumping(rows, key_row, key_cls, key_pos, outside_raw)


def _sum_outside(p_general: Tensor, rows: Tensor, key_row: Tensor, key_cls: Tensor, chunk: int = 256) -> Tensor:
    """``(R,)`` sums of ``p_general[rows[i], j]`` over the classes ``j`` outside row ``i``'s
    union, given as entries ``(key_row (N,), key_cls (N,))`` sorted by row. Summed directly (no
    ``total - inside`` cancellation), ``chunk`` rows at a time to bound the temporary."""
    out = p_general.new_empty(rows.numel())
    bounds = torch.searchsorted(key_row, torch.arange(0, rows.numel() + chunk, chunk, device=rows.device)).tolist()
    for k, start in enumerate(range(0, rows.numel(), chunk)):
        block = p_general[rows[start : start + chunk]]  # (chunk, K) copy
        lo, hi = bounds[k], bounds[k + 1]
        block[key_row[lo:hi] - start, key_cls[lo:hi]] = 0
        out[start : start + chunk] = block.sum(dim=1)
    return out


def expand(q: Tensor, p_general: Tensor, lumping: Lumping) -> Tensor:
    """Lumped ``q (R, n)`` -> ``(B, K)``: union classes from ``q``, the lump's mass spread over
    the other classes in proportion to ``p_general`` (uniformly where that mass is 0). Rows
    that were not solved are ``p_general`` unchanged (multiplied by exactly 1)."""
    lump = q[:, -1]
    has_mass = lumping.outside_raw > 0
    scale = torch.ones(p_general.shape[0], dtype=q.dtype, device=q.device)
    scale[lumping.rows] = torch.where(has_mass, lump / torch.where(has_mass, lumping.outside_raw, 1), 0)
    out = p_general * scale.unsqueeze(1)
    spread = ~has_mass & (lump > 0)
    if bool(spread.any()):
        local = spread.nonzero().squeeze(1)
        rest = torch.ones(local.numel(), p_general.shape[1], dtype=q.dtype, device=q.device)
        entry = torch.isin(lumping.row, local)
        rest[torch.searchsorted(local, lumping.row[entry]), lumping.cls[entry]] = 0
        out[lumping.rows[local]] += rest * (lump[local] / rest.sum(dim=1).clamp_min(1)).unsqueeze(1)
    out[lumping.rows[lumping.row], lumping.cls] = q[lumping.row, lumping.pos]
    return out
