"""Specialist models (DESIGN §2.2; Hinton, Vinyals & Dean 2015, section 5).

A specialist for a group ``S_m`` of confusable classes is a deep copy of the generalist's
trunk (``stem`` -> ``blocks`` -> pooling, i.e. ``forward_features``) with a new head of
``|S_m| + 1`` outputs: the group's classes in the recorded order, then a *dustbin* standing
for every class outside ``S_m``.

Head and initialisation. With ``h = forward_features(x)`` of shape ``(B, D)`` and the
generalist head ``z = W h + b`` of shape ``(B, K)``, the specialist logits are::

    group logits   (B, |S_m|) : W_S h + b_S                     (trainable copy of rows S_m)
    dustbin logit  (B,)       : logsumexp(W_out h + b_out) + dustbin_bias

``W_out, b_out`` are a copy of the generalist head rows outside ``S_m``; ``dustbin_bias`` is a
learned scalar initialised to 0. Because ``softmax([z_S, logsumexp(z_out)])`` equals
``[p_S, sum(p_out)]`` for ``p = softmax(z)``, the untrained specialist reproduces the
generalist's probabilities collapsed onto (S_m classes, dustbin) exactly (up to float
rounding).

Decision on the out-rows: by default ``W_out, b_out`` are *frozen buffers*. The dustbin then
keeps the generalist's knowledge of "everything else" as an anchor, only the scalar
``dustbin_bias`` (and the trunk, if fine-tuned) moves it, and the head has ``|S_m| * (D + 1)
+ 1`` trainable parameters instead of ``K * (D + 1)``. Pass ``train_out_rows=True`` to make
them trainable parameters instead (they then count as part of the head).

Fine-tuning modes (``finetune``):

- ``"all"``: everything trainable.
- ``"head"``: trunk frozen, only the head (+ dustbin bias) trains. The trunk stays identical
  to the generalist's (as long as the generalist itself is not changed), so an ensemble can
  compute trunk features once and call :meth:`Specialist.head_logits`.
- ``"last_n"``: only ``blocks[-last_n:]`` and the head train. Anything else in the trunk
  (stem, earlier blocks, any norm/pool applied after the blocks) is frozen.

Frozen parameters have ``requires_grad=False`` and frozen modules are kept in eval mode by
:meth:`Specialist.train`, so BatchNorm running statistics and dropout in them do not change
behaviour during specialist training.
"""

from __future__ import annotations

import copy
import math
import operator
from collections import Counter
from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from generalist.models.base import init_conv_bn

FINETUNE_MODES: tuple[str, ...] = ("all", "head", "last_n")

__all__ = [
    "FINETUNE_MODES",
    "Specialist",
    "build_specialist",
    "reinitialise_trailing",
    "collapse_probs",
    "trainable_parameters",
    "validate_group",
]


def validate_group(group: Sequence[int], num_classes: int | None = None) -> tuple[int, ...]:
    """Check a group of class ids and return it as a tuple in the given order.

    Args:
        group: class ids of the specialist's group ``S_m`` (ints, numpy ints or a 1-D integer
            tensor). The order is kept: it defines the specialist's output order.
        num_classes: total number of classes ``K``; when given, ids must lie in ``[0, K)`` and
            the group must leave at least one class for the dustbin.

    Raises:
        ValueError: empty group, non-integer ids, duplicates, negative or out-of-range ids, or
            a group covering all ``K`` classes.
    """
    if isinstance(group, Tensor):
        if group.dim() != 1:
            raise ValueError(f"group must be a 1-D sequence of class ids, got a tensor of shape "
                             f"{tuple(group.shape)}; pass e.g. group.flatten().tolist()")
        group = group.tolist()
    if isinstance(group, str | bytes) or not isinstance(group, Iterable):
        raise ValueError(f"group must be a sequence of integer class ids, got {group!r}; "
                         "pass e.g. [3, 7, 11]")
    ids: list[int] = []
    for g in group:
        if isinstance(g, bool):
            raise ValueError(f"group entries must be integer class ids, got the bool {g!r}")
        try:
            ids.append(operator.index(g))
        except TypeError:
            raise ValueError(f"group entries must be integer class ids, got {g!r} "
                             f"({type(g).__name__}); convert them with int()") from None
    if not ids:
        raise ValueError("group is empty: a specialist needs at least one class id in S_m")
    dups = sorted(c for c, n in Counter(ids).items() if n > 1)
    if dups:
        raise ValueError(f"group has duplicate class ids {dups}; list each class once")
    neg = [c for c in ids if c < 0]
    if neg:
        raise ValueError(f"group has negative class ids {neg}; class ids start at 0")
    if num_classes is not None:
        bad = [c for c in ids if c >= num_classes]
        if bad:
            raise ValueError(f"group has class ids {bad} out of range for a generalist with "
                             f"{num_classes} classes; ids must lie in [0, {num_classes})")
        if len(ids) == num_classes:
            raise ValueError(f"group covers all {num_classes} classes, so the specialist's "
                             "dustbin would be empty; a specialist needs a non-empty dustbin: "
                             "leave at least one class out of the group")
    return tuple(ids)


def collapse_probs(p: Tensor, group: Sequence[int]) -> Tensor:
    """Collapse class probabilities onto (group classes in order, dustbin).

    Args:
        p: probabilities over ``K`` classes, shape ``(B, K)``.
        group: class ids ``S_m`` (validated with :func:`validate_group`).

    Returns:
        ``(B, |S_m| + 1)``: ``p[:, group]`` then the dustbin column ``sum of p outside S_m``
        (summed directly, not ``1 - sum(p_S)``, to avoid cancellation).
    """
    if not isinstance(p, Tensor) or p.dim() != 2:
        shape = tuple(p.shape) if isinstance(p, Tensor) else type(p).__name__
        raise ValueError(f"p must be a (B, K) tensor of probabilities, got {shape}; "
                         "add a batch dimension with p.unsqueeze(0)")
    ids = validate_group(group, p.shape[1])
    in_idx = torch.tensor(ids, dtype=torch.long, device=p.device)
    mask = torch.ones(p.shape[1], dtype=torch.bool, device=p.device)
    mask[in_idx] = False
    dustbin = p[:, mask].sum(dim=1, keepdim=True)
    return torch.cat([p.index_select(1, in_idx), dustbin], dim=1)


def _check_generalist(generalist: nn.Module) -> nn.Linear:
    """Return the generalist's head after checking the Classifier contract."""
    if not isinstance(generalist, nn.Module):
        raise ValueError(f"generalist must be an nn.Module, got {type(generalist).__name__}")
    head = getattr(generalist, "head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError("generalist must have a `head` nn.Linear (D -> K) as in "
                         "generalist.models.Classifier; unwrap DDP/compiled models "
                         "(e.g. model.module or model._orig_mod) before building a specialist")
    if not callable(getattr(generalist, "forward_features", None)):
        raise ValueError("generalist must define forward_features(x) -> (B, D) as in "
                         "generalist.models.Classifier")
    return head


class Specialist(nn.Module):
    """Generalist trunk copy + (|S_m| group classes, dustbin) head. See the module docstring.

    Attributes:
        trunk: deep copy of the generalist with its head replaced by ``nn.Identity`` (so
            ``trunk(x)`` returns features; use ``Specialist.feature_dim``, not the trunk's
            ``feature_dim``/``num_classes`` properties, which read the removed head).
        head: ``nn.Linear(D, |S_m|)``, the group rows.
        out_weight, out_bias: ``(K - |S_m|, D)`` and ``(K - |S_m|,)`` rows outside ``S_m``
            (buffers, or parameters when ``train_out_rows``).
        dustbin_bias: scalar parameter (shape ``()``) added to the dustbin logit.
        group: ``S_m`` in output order; ``dustbin_index == len(group)``.
        num_classes: ``K`` of the generalist. ``finetune``, ``last_n``: the fine-tuning mode.
    """

    def __init__(self, generalist: nn.Module, group: Sequence[int], *, finetune: str = "all",
                 last_n: int = 1, train_out_rows: bool = False) -> None:
        super().__init__()
        g_head = _check_generalist(generalist)
        num_classes, dim = g_head.out_features, g_head.in_features
        ids = validate_group(group, num_classes)
        self._check_mode(generalist, finetune, last_n)
        self.group: tuple[int, ...] = ids
        self.dustbin_index: int = len(ids)
        self.num_classes: int = num_classes
        self.feature_dim: int = dim
        self.finetune: str = finetune
        self.last_n: int = last_n
        self.train_out_rows: bool = train_out_rows

        self.trunk = copy.deepcopy(generalist)
        self.trunk.head = nn.Identity()
        weight = g_head.weight.detach()
        bias = g_head.bias.detach() if g_head.bias is not None else weight.new_zeros(num_classes)
        in_idx = torch.tensor(ids, dtype=torch.long, device=weight.device)
        out_mask = torch.ones(num_classes, dtype=torch.bool, device=weight.device)
        out_mask[in_idx] = False

        self.head = nn.Linear(dim, len(ids), device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            self.head.weight.copy_(weight.index_select(0, in_idx))
            self.head.bias.copy_(bias.index_select(0, in_idx))
        out_w, out_b = weight[out_mask].clone(), bias[out_mask].clone()
        if train_out_rows:
            self.out_weight = nn.Parameter(out_w)
            self.out_bias = nn.Parameter(out_b)
        else:
            self.register_buffer("out_weight", out_w)
            self.register_buffer("out_bias", out_b)
        self.dustbin_bias = nn.Parameter(weight.new_zeros(()))
        # NaN = no prior correction applied yet; a buffer so it survives state_dict round trips.
        self.register_buffer("_prior_correction", torch.tensor(math.nan, dtype=torch.float32))
        self._apply_requires_grad()
        self.train(generalist.training)

    @staticmethod
    def _check_mode(generalist: nn.Module, finetune: str, last_n: int) -> None:
        if finetune not in FINETUNE_MODES:
            raise ValueError(f"unknown finetune mode {finetune!r}; use one of {FINETUNE_MODES}")
        if finetune != "last_n":
            return
        blocks = getattr(generalist, "blocks", None)
        if not isinstance(blocks, nn.Sequential):
            raise ValueError("finetune='last_n' needs the generalist to have `blocks` as an "
                             "nn.Sequential; use finetune='all' or 'head' instead")
        if isinstance(last_n, bool) or not isinstance(last_n, int):
            raise ValueError(f"last_n must be an int, got {last_n!r}")
        if not 1 <= last_n <= len(blocks):
            raise ValueError(f"last_n={last_n} is out of range: the generalist has "
                             f"{len(blocks)} blocks, so use 1 <= last_n <= {len(blocks)} "
                             "(or finetune='all' to train everything)")

    # ----------------------------------------------------------------- trainability
    def _trainable_trunk_modules(self) -> list[nn.Module]:
        """Trunk modules that train under the current mode (the whole trunk for ``all``)."""
        if self.finetune == "all":
            return [self.trunk]
        if self.finetune == "head":
            return []
        return list(self.trunk.blocks[-self.last_n:])

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters that train under ``finetune`` (unique, in module order)."""
        keep = {id(p) for m in self._trainable_trunk_modules() for p in m.parameters()}
        keep |= {id(p) for p in self.head.parameters()}
        keep.add(id(self.dustbin_bias))
        if self.train_out_rows:
            keep |= {id(self.out_weight), id(self.out_bias)}
        return [p for p in self.parameters() if id(p) in keep]

    def _apply_requires_grad(self) -> None:
        keep = {id(p) for p in self.trainable_parameters()}
        for p in self.parameters():
            p.requires_grad_(id(p) in keep)

    def train(self, mode: bool = True) -> Specialist:
        """Set train/eval mode; frozen trunk modules always stay in eval mode."""
        super().train(mode)
        if mode and self.finetune != "all":
            self.trunk.train(False)
            for m in self._trainable_trunk_modules():
                m.train(True)
        return self

    @property
    def trunk_frozen(self) -> bool:
        """True when the whole trunk is frozen (``finetune="head"``)."""
        return self.finetune == "head"

    # ----------------------------------------------------------------- forward
    @property
    def out_classes(self) -> tuple[int, ...]:
        """Class ids folded into the dustbin, ascending."""
        members = set(self.group)
        return tuple(c for c in range(self.num_classes) if c not in members)

    def forward_features(self, x: Tensor) -> Tensor:
        """Trunk features: ``(B, C, H, W) -> (B, D)``."""
        return self.trunk.forward_features(x)

    def head_logits(self, features: Tensor) -> Tensor:
        """Head only: ``(B, D)`` trunk features -> ``(B, |S_m| + 1)`` logits (dustbin last)."""
        if features.dim() != 2 or features.shape[1] != self.feature_dim:
            raise ValueError(f"features must have shape (B, {self.feature_dim}), got "
                             f"{tuple(features.shape)}; pass forward_features(x)")
        group_logits = self.head(features)
        out_logits = F.linear(features, self.out_weight, self.out_bias)
        dustbin = torch.logsumexp(out_logits, dim=1) + self.dustbin_bias
        return torch.cat([group_logits, dustbin.unsqueeze(1)], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, |S_m| + 1)`` logits: group classes in order, then dustbin."""
        return self.head_logits(self.forward_features(x))

    # ----------------------------------------------------------------- prior correction
    @property
    def prior_correction(self) -> float | None:
        """Log-offset already added to the dustbin bias, or None if not corrected yet."""
        value = float(self._prior_correction)
        return None if math.isnan(value) else value

    def add_prior_correction(self, log_offset: float) -> None:
        """Add ``log_offset`` to the dustbin bias in place and record it (at most once).

        Prefer :func:`specialists.prior.apply_prior_correction`, which computes the offset and
        works on a copy.
        """
        if self.prior_correction is not None:
            raise ValueError(f"a prior correction ({self.prior_correction:.6g}) was already "
                             "applied to this specialist; apply it once, to the trained "
                             "uncorrected specialist")
        if not math.isfinite(log_offset):
            raise ValueError(f"log_offset must be finite, got {log_offset}")
        with torch.no_grad():
            self.dustbin_bias.add_(log_offset)
            self._prior_correction.fill_(log_offset)

    def extra_repr(self) -> str:
        return (f"group={self.group}, num_classes={self.num_classes}, "
                f"finetune={self.finetune!r}, last_n={self.last_n}, "
                f"train_out_rows={self.train_out_rows}")


def build_specialist(generalist: nn.Module, group: Sequence[int], *, finetune: str = "all",
                     last_n: int = 1, train_out_rows: bool = False) -> Specialist:
    """Build a specialist for ``group`` from a trained generalist (which is not modified).

    Args:
        generalist: a ``generalist.models.Classifier``-like module with ``forward_features``
            ``(B, C, H, W) -> (B, D)`` and ``head: nn.Linear(D, K)`` (and ``blocks:
            nn.Sequential`` for ``finetune="last_n"``).
        group: class ids ``S_m`` in the order of the specialist's outputs.
        finetune: ``"all"``, ``"head"`` or ``"last_n"`` (see module docstring).
        last_n: number of trailing blocks to train when ``finetune="last_n"``.
        train_out_rows: make the dustbin's copy of the out-of-group head rows trainable.

    Returns:
        A :class:`Specialist` whose untrained outputs ``softmax(spec(x))`` of shape
        ``(B, |S_m| + 1)`` equal ``collapse_probs(softmax(generalist(x)), group)``.
    """
    return Specialist(generalist, group, finetune=finetune, last_n=last_n,
                      train_out_rows=train_out_rows)


def reinitialise_trailing(specialist: Specialist, blocks: int) -> Specialist:
    """Start ``trunk.blocks[-blocks:]`` and the whole head afresh, in place, from the current torch
    seed: Kaiming-normal convs, unit/zero norms with reset running statistics, torch's default
    Linear init for the group rows and the dustbin's out-rows (which must be trainable:
    ``train_out_rows=True``, since the generalist's rows no longer fit the new features).

    A specialist fine-tuned from the generalist keeps its errors; one whose last blocks start
    fresh errs differently, which is what lets a combination of models gain (DESIGN §2.2).
    """
    blocks_seq = getattr(specialist.trunk, "blocks", None)
    if not isinstance(blocks_seq, nn.Sequential):
        raise ValueError("re-initialising trailing blocks needs the generalist to have `blocks` as an "
                         "nn.Sequential; use specialists.reinit_blocks=0 for this model")
    if isinstance(blocks, bool) or not isinstance(blocks, int) or not 1 <= blocks <= len(blocks_seq):
        raise ValueError(f"reinit_blocks={blocks!r} is out of range: the generalist has {len(blocks_seq)} "
                         f"blocks, so use 1 <= reinit_blocks <= {len(blocks_seq)} (or 0 to keep them all)")
    if specialist.finetune == "head" or (specialist.finetune == "last_n" and specialist.last_n < blocks):
        raise ValueError(f"reinit_blocks={blocks} would leave fresh blocks frozen under finetune="
                         f"{specialist.finetune!r}; use finetune='all', or last_n >= reinit_blocks")
    if not specialist.train_out_rows:
        raise ValueError("re-initialised specialists need trainable out-rows: build them with "
                         "train_out_rows=True")
    fresh_blocks = blocks_seq[-blocks:]
    for module in fresh_blocks.modules():  # every layer's own init (norms also reset their running statistics)
        if module is not fresh_blocks and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    init_conv_bn(fresh_blocks)  # then the generalists' conv/norm init
    fresh = nn.Linear(specialist.feature_dim, specialist.out_weight.shape[0], device=specialist.out_weight.device,
                      dtype=specialist.out_weight.dtype)
    with torch.no_grad():
        specialist.head.reset_parameters()
        specialist.out_weight.copy_(fresh.weight)
        specialist.out_bias.copy_(fresh.bias)
        specialist.dustbin_bias.zero_()
    return specialist


def trainable_parameters(specialist: Specialist) -> list[nn.Parameter]:
    """The parameters to hand to the optimizer under the specialist's ``finetune`` mode."""
    if not isinstance(specialist, Specialist):
        raise ValueError(f"expected a Specialist, got {type(specialist).__name__}; build one "
                         "with build_specialist(generalist, group)")
    return specialist.trainable_parameters()
