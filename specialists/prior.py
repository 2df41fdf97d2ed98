"""Prior correction for specialists trained on a half-and-half mix (DESIGN §2.2).

The paper (Hinton, Vinyals & Dean 2015, section 5) trains each specialist on data where
half the examples come from its group ``S_m`` and afterwards "increments the logit of the
dustbin class by the log of the proportion by which the specialist class is oversampled".

Derivation. Let ``pi = P(y in S_m)`` on the training set and ``f`` the fraction of
in-group examples in the training mix (``f = 0.5`` for the 50/50 sampler). The sampler draws
uniformly *within* each half, so the class-conditional data and the relative class
frequencies inside ``S_m`` and inside its complement are unchanged; only the mass of the two
halves changes. The training distribution is therefore ``q(x, y) = p(x, y) w(y)`` with::

    w(y) = f / pi              for y in S_m
    w(y) = (1 - f) / (1 - pi)  for y outside S_m (every class folded into the dustbin)

so for the specialist's outcomes ``c`` in (S_m classes, dustbin),
``q(c | x) ∝ p(c | x) w(c)``. A specialist fitted to ``q`` has logits
``z_c = log q(c | x) + a(x)``, hence ``log p(c | x) = z_c - log w(c) + a'(x)``. Adding the
same constant to every logit leaves the softmax unchanged, so it suffices to add
``log w(in) - log w(out)`` to the dustbin logit only::

    correction = log(f / pi) - log((1 - f) / (1 - pi))
               = log((1 - pi) / pi) - log((1 - f) / f)

i.e. the log of the factor by which the odds of the group are inflated by the mix. For
``f = 0.5`` it is ``log((1 - pi) / pi)``: e.g. ``pi = 0.2`` -> ``+log 4`` on the dustbin.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from specialists.model import Specialist
from specialists.sampler import in_group_mask

__all__ = ["apply_prior_correction", "dustbin_log_correction", "group_prior", "shift_to_training_mix"]


def group_prior(labels: Tensor | np.ndarray, group: Sequence[int]) -> float:
    """``pi_m``: fraction of ``labels`` (shape ``(N,)``, training set) that lie in ``group``."""
    mask = in_group_mask(labels, group)
    if mask.numel() == 0:
        raise ValueError("labels is empty; pass the training-set labels to compute the prior")
    return float(mask.double().mean())


def _check_fraction(name: str, value: float, hint: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a float in (0, 1), got {value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a float in (0, 1), got {value!r}") from None
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must lie strictly between 0 and 1, got {value}; {hint}")
    return value


def dustbin_log_correction(pi_m: float, in_group_fraction: float = 0.5) -> float:
    """Log-offset to add to the dustbin logit after training on a biased mix.

    Args:
        pi_m: true fraction of training examples with a label in ``S_m`` (see
            :func:`group_prior`).
        in_group_fraction: ``f``, fraction of in-group examples in the training batches
            (``HalfAndHalfBatchSampler.in_group_fraction``; 0.5 for even batch sizes).

    Returns:
        ``log((1 - pi_m) / pi_m) - log((1 - f) / f)`` (see the module docstring). Zero when
        the mix matches the prior; positive when the group was oversampled.
    """
    pi = _check_fraction("pi_m", pi_m, "a group with no (or all) training examples cannot "
                         "have a specialist")
    f = _check_fraction("in_group_fraction", in_group_fraction,
                        "use the sampler's in_group_fraction, e.g. 0.5")
    return math.log((1.0 - pi) / pi) - math.log((1.0 - f) / f)


def apply_prior_correction(specialist: Specialist, pi_m: float,
                           in_group_fraction: float = 0.5) -> Specialist:
    """Return a corrected copy of a trained specialist (the input is left unchanged).

    The offset from :func:`dustbin_log_correction` is added to ``dustbin_bias`` and
    recorded in ``prior_correction`` (also saved in the state dict); correcting an already
    corrected specialist raises ValueError.
    """
    if not isinstance(specialist, Specialist):
        raise ValueError(f"expected a Specialist, got {type(specialist).__name__}")
    if specialist.prior_correction is not None:
        raise ValueError(f"this specialist already has a prior correction "
                         f"({specialist.prior_correction:.6g}); apply it only once")
    offset = dustbin_log_correction(pi_m, in_group_fraction)
    corrected = copy.deepcopy(specialist)
    corrected.add_prior_correction(offset)
    return corrected


def shift_to_training_mix(specialist: Specialist, pi_m: float, in_group_fraction: float = 0.5) -> None:
    """Start a freshly built specialist from the generalist's posterior under the training mix.

    A specialist built from the generalist reproduces the generalist's collapsed posterior,
    which is calibrated to the natural prior pi_m; but it trains on a mix with a share
    ``in_group_fraction`` of in-group examples. Subtracting the prior correction from the
    dustbin bias (in place, not recorded) makes the starting point the Bayes posterior under
    that mix, so training does not have to learn the prior shift and the correction applied
    after training (:func:`apply_prior_correction`) is exact: an untrained specialist, shifted
    and then corrected, equals the generalist again. Without the shift, a specialist that moves
    little during training gets the correction on top of an already natural-prior posterior,
    which over-weights the dustbin.
    """
    if specialist.prior_correction is not None:
        raise ValueError("shift_to_training_mix applies to an uncorrected specialist before training")
    with torch.no_grad():
        specialist.dustbin_bias.sub_(dustbin_log_correction(pi_m, in_group_fraction))
