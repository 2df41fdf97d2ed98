"""Latency of models as a deployment sees it: per example, at a given batch, timed side by side.

:func:`measure_latency_ms` times one predictor; :func:`latencies_side_by_side` times several
in round-robin rounds, so every model is measured under the same machine conditions rather than
under whatever the machine was doing when each finished training.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

__all__ = ["latencies_side_by_side", "measure_latency_ms"]


@torch.no_grad()
def measure_latency_ms(
    predict: Callable[[Tensor], object],
    example: Tensor,
    *,
    repeats: int = 20,
    warmup: int = 3,
) -> float:
    """Per-example latency of ``predict`` on ``example (B, C, H, W)`` in milliseconds: the
    median of ``repeats`` timed calls (after ``warmup`` untimed ones) divided by ``B``.
    Use ``B = 1`` for the latency a single request sees."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if example.ndim != 4 or example.shape[0] < 1:
        raise ValueError(f"example must be (B, C, H, W) with B >= 1, got {tuple(example.shape)}")
    sync = torch.cuda.synchronize if example.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        predict(example)
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predict(example)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0 / example.shape[0]


def latencies_side_by_side(predictors: Mapping[str, Callable[[Tensor], object]], example: Tensor, *,
                           rounds: int = 5, repeats: int = 20, warmup: int = 2) -> dict[str, float]:
    """Per-example latency (ms) of each predictor on ``example (B, C, H, W)``: ``rounds`` rounds
    in which every predictor takes its turn (``repeats`` timed calls after ``warmup``), under
    ``torch.inference_mode``; each predictor gets the median of its rounds."""
    if rounds < 1:
        raise ValueError(f"need rounds >= 1, got {rounds}")
    samples: dict[str, list[float]] = {name: [] for name in predictors}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, predict in predictors.items():
                samples[name].append(measure_latency_ms(predict, example, repeats=repeats, warmup=warmup))
    return {name: statistics.median(values) for name, values in samples.items()}
