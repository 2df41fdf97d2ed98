"""Combining a generalist with its specialists (Hinton, Vinyals & Dean 2015, section 5, eq. 5).

For each example, with ``p^g (K,)`` the generalist's distribution and ``A`` the active
specialists (those whose group holds one of the generalist's top-``n`` classes), find the full
distribution ``q`` over ``K`` classes minimising

    F(q) = KL(p^g || q) + sum_{m in A} KL(p^m || q~^m),

``q~^m`` being ``q`` collapsed onto group ``m`` + dustbin (the dustbin takes the mass of every
class outside the group). ``F`` is convex in ``q``.

Modules, in the order the data flows:

- :mod:`~specialists.ensemble.membership`: :class:`GroupMembership` (which classes each
  specialist covers) and the routed form of the specialists' outputs;
- :mod:`~specialists.ensemble.routing`: the active specialists of each example;
- :mod:`~specialists.ensemble.validation`: the input checks every solver shares;
- :mod:`~specialists.ensemble.problem`: eq. 5 in batched form (dense and lumped layouts);
- :mod:`~specialists.ensemble.fixed_point`: the production solver, the exact EM fixed-point
  iteration accelerated with SQUAREM (:func:`solve_fixed_point`);
- :mod:`~specialists.ensemble.reference_solver`: per-example gradient descent on the logits of
  ``q`` as in the paper (:func:`solve_reference`), slow, the baseline;
- :mod:`~specialists.ensemble.objective`: ``F(q)`` for any ``q`` (:func:`combine_objective`);
- :mod:`~specialists.ensemble.routed_ensemble`: models in, ``q`` out (:func:`build_ensemble`,
  :func:`ensemble_forward`), each specialist run only on its active examples;
- :mod:`~specialists.ensemble.soft_targets`: ``softmax(log q / T)`` of the ensemble for a batch
  of any size (:func:`ensemble_soft_targets`);
- :mod:`~specialists.ensemble.evaluation`: the paper's Table 4 and per-group accuracy;
- :mod:`~specialists.ensemble.cache_format`, :mod:`~specialists.ensemble.cache_writer`,
  :mod:`~specialists.ensemble.cache_reader`: the soft-target cache on disk (``q`` per example of
  a split, dense or top-k float16 shards, a manifest) and its memory-mapped reader.

Inputs are validated (``ValueError`` naming the rows at fault), cast to ``dtype`` (``float64``
by default; ``float32`` also works) and renormalised per row.
"""

from specialists.ensemble.cache_format import (
    BUILD_COMMAND,
    CacheCorruptError,
    CacheLayout,
    CacheMismatchError,
)
from specialists.ensemble.cache_reader import SoftTargetCache
from specialists.ensemble.cache_writer import write_cache, write_shards
from specialists.ensemble.evaluation import evaluate_predictions
from specialists.ensemble.fixed_point import solve_fixed_point
from specialists.ensemble.membership import GroupMembership, SpecialistOutput
from specialists.ensemble.objective import combine_objective
from specialists.ensemble.reference_solver import solve_reference
from specialists.ensemble.routed_ensemble import (
    EnsembleOutput,
    RoutedEnsemble,
    build_ensemble,
    combine_routed,
    ensemble_forward,
    ensemble_forward_at,
    shares_trunk,
    specialist_outputs,
)
from specialists.ensemble.routing import active_specialists, route
from specialists.ensemble.soft_targets import ensemble_soft_targets

__all__ = [
    "BUILD_COMMAND",
    "CacheCorruptError",
    "CacheLayout",
    "CacheMismatchError",
    "EnsembleOutput",
    "GroupMembership",
    "RoutedEnsemble",
    "SoftTargetCache",
    "SpecialistOutput",
    "active_specialists",
    "build_ensemble",
    "combine_objective",
    "combine_routed",
    "ensemble_forward",
    "ensemble_forward_at",
    "ensemble_soft_targets",
    "evaluate_predictions",
    "route",
    "shares_trunk",
    "solve_fixed_point",
    "solve_reference",
    "specialist_outputs",
    "write_cache",
    "write_shards",
]
