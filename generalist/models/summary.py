"""Parameter counts and forward-latency measurement."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["ModelSummary", "count_parameters", "summarize_model"]


@dataclass(frozen=True)
class ModelSummary:
    """``params``: parameter count; ``latency_ms``: eval forward time per example (median of repeats)."""

    params: int
    latency_ms: float
    batch_size: int
    device: str


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (trainable or not; shared tensors counted once; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize_model(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    *,
    batch_size: int = 64,
    repeats: int = 5,
    device: str | torch.device = "cpu",
) -> ModelSummary:
    """Count parameters and time ``model`` on random ``(batch_size, *input_shape)`` inputs in [0, 1].

    Runs in eval mode under ``torch.no_grad`` after one warm-up pass; ``latency_ms`` is the median
    over ``repeats`` timed passes divided by ``batch_size``.  The model's training flag and device
    are restored afterwards.
    """
    if batch_size < 1 or repeats < 1:
        raise ValueError(f"batch_size and repeats must be >= 1, got {batch_size} and {repeats}")
    if len(input_shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape}")
    dev = torch.device(device)
    first = next(model.parameters(), None)
    original_device = first.device if first is not None else dev
    was_training = model.training
    model.to(dev).eval()
    x = torch.rand(batch_size, *input_shape, device=dev)  # (B, C, H, W)
    times: list[float] = []
    try:
        with torch.no_grad():
            model(x)  # warm-up
            _sync(dev)
            for _ in range(repeats):
                start = time.perf_counter()
                model(x)
                _sync(dev)
                times.append(time.perf_counter() - start)
    finally:
        model.train(was_training)
        model.to(original_device)
    latency_ms = statistics.median(times) * 1000.0 / batch_size
    return ModelSummary(count_parameters(model), latency_ms, batch_size, str(dev))
