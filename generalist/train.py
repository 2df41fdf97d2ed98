"""Pure training components: optimizer/scheduler factories, batching, one epoch, evaluation, early stopping.

No file I/O, no logging, no printing: progress goes through the callbacks the caller passes.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "EarlyStopping",
    "EpochResult",
    "NonFiniteLossError",
    "build_optimizer",
    "build_scheduler",
    "evaluate",
    "iterate_batches",
    "mixed_precision",
    "native_cpu_bf16",
    "set_seed",
    "train_one_epoch",
]

OPTIMIZERS = ("sgd", "adamw")
_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


class NonFiniteLossError(RuntimeError):
    """Loss became NaN/Inf at ``(epoch, step)``; raised before the optimizer step, so weights are intact."""

    def __init__(self, epoch: int, step: int, loss: float) -> None:
        self.epoch = epoch
        self.step = step
        self.loss = loss
        super().__init__(
            f"non-finite loss ({loss}) at epoch {epoch}, step {step}: the optimizer step was skipped and "
            "the last good checkpoint is kept; lower the learning rate or check the data for NaN/Inf"
        )

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across processes (Ray)
        return (type(self), (self.epoch, self.step, self.loss))


def set_seed(seed: int, *, deterministic: bool = False) -> None:
    """Seed ``random``, ``numpy`` and ``torch`` (all devices); optionally force deterministic cuDNN."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Split trainable params into ``decay`` and ``no_decay`` (biases, 1-d params, norm-layer params)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(module, _NORM_TYPES) or pname.endswith("bias") or p.ndim <= 1:
                no_decay.append(p)
            else:
                decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "group_name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "group_name": "no_decay"},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    name: str,
    *,
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """``"sgd"`` (Nesterov when ``momentum > 0``) or ``"adamw"`` (``betas=(momentum, 0.999)``).

    Only parameters with ``requires_grad`` are optimised; norm-layer parameters and biases get no
    weight decay.  Param groups carry ``group_name`` = ``"decay"`` / ``"no_decay"``.
    """
    key = name.lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; options: {', '.join(OPTIMIZERS)}")
    if lr <= 0 or weight_decay < 0 or not 0 <= momentum < 1:
        raise ValueError(
            f"need lr > 0, weight_decay >= 0, 0 <= momentum < 1; got {lr}, {weight_decay}, {momentum}"
        )
    groups = _param_groups(model, weight_decay)
    if not groups:
        raise ValueError("model has no trainable parameters")
    if key == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=momentum > 0)
    return torch.optim.AdamW(groups, lr=lr, betas=(momentum, 0.999))


def warmup_cosine_factor(step: int, *, total_steps: int, warmup_steps: int) -> float:
    """LR multiplier for batch ``step`` (0-based): ``(step+1)/warmup`` during warm-up, then cosine to 0.

    The factor is 1 at ``step = warmup_steps - 1`` and ``warmup_steps``, and exactly 0 from
    ``step = total_steps`` on (i.e. after the last batch's ``scheduler.step()``).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupPlateau:
    """LR multiplier for a train-to-convergence schedule: linear warm-up over ``warmup_steps``
    batches, then constant, multiplied by ``factor`` whenever the monitored holdout loss has not
    improved for ``patience`` epochs (reduce on plateau). Use it as ``LambdaLR``'s lambda (its
    state travels in the scheduler's ``state_dict``) and call :meth:`epoch_end` after each
    epoch's holdout evaluation; early stopping with a longer patience ends training once lower
    rates no longer help."""

    def __init__(self, warmup_steps: int = 0, factor: float = 0.3, patience: int = 2) -> None:
        if not 0 < factor < 1 or patience < 1:
            raise ValueError(f"need 0 < factor < 1 and patience >= 1, got {factor} and {patience}")
        self.warmup_steps, self.factor, self.patience = warmup_steps, factor, patience
        self.scale, self.best, self.bad_epochs, self.reductions = 1.0, math.inf, 0, 0

    def __call__(self, step: int) -> float:
        warm = (step + 1) / self.warmup_steps if step < self.warmup_steps else 1.0
        return warm * self.scale

    def epoch_end(self, loss: float) -> None:
        if loss < self.best:
            self.best, self.bad_epochs = float(loss), 0
            return
        self.bad_epochs += 1
        if self.bad_epochs >= self.patience:
            self.scale, self.bad_epochs, self.reductions = self.scale * self.factor, 0, self.reductions + 1


def plateau_epoch_end(scheduler: torch.optim.lr_scheduler.LRScheduler | None, loss: float) -> None:
    """Tell a :class:`WarmupPlateau` schedule the epoch's holdout loss (other schedules: no-op)."""
    seen = set()
    for fn in getattr(scheduler, "lr_lambdas", ()):  # one entry per parameter group, often the same object
        if isinstance(fn, WarmupPlateau) and id(fn) not in seen:
            seen.add(id(fn))
            fn.epoch_end(loss)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    total_steps: int,
    warmup_steps: int = 0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up over ``warmup_steps`` batches, then cosine decay to 0 at ``total_steps``; step per batch."""
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"need total_steps >= 1 and 0 <= warmup_steps <= total_steps; got {total_steps}, {warmup_steps}"
        )

    def factor(step: int) -> float:
        return warmup_cosine_factor(step, total_steps=total_steps, warmup_steps=warmup_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(
        np.random.SeedSequence([seed % 2**63, epoch % 2**63]).generate_state(1, np.uint64)[0] >> 1
    )


def iterate_batches(
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    device: str | torch.device = "cpu",
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x, y)``: ``x`` float32 in [0, 1] ``(B, C, H, W)``, ``y`` int64 ``(B,)``, both on ``device``.

    ``images``: ``(N, C, H, W)`` uint8 (divided by 255) or floating (taken as already in [0, 1]).
    ``labels``: ``(N,)``.  With ``shuffle`` the order depends only on ``(seed, epoch)``, so a
    resumed run sees the same batches; without it the order is ``0..N-1``.  Conversion to float
    happens after the move to ``device`` (uint8 transfers are 4x smaller).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"labels must be (N,) with N={images.shape[0]}, got shape {tuple(labels.shape)}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = images.shape[0]
    if shuffle:
        generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
        order = torch.randperm(n, generator=generator)
    else:
        order = torch.arange(n)
    stop = n - n % batch_size if drop_last else n
    return _batches(images, labels, order, batch_size, stop, torch.device(device))


def _batches(
    images: Tensor, labels: Tensor, order: Tensor, batch_size: int, stop: int, device: torch.device
) -> Iterator[tuple[Tensor, Tensor]]:
    non_blocking = device.type == "cuda"
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size].to(images.device)
        x = images[idx].to(device, non_blocking=non_blocking)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        y = labels[idx.to(labels.device)].to(device, non_blocking=non_blocking).long()
        yield x, y


@dataclass(frozen=True)
class EpochResult:
    """Summary of one training epoch; ``loss`` and ``accuracy`` are means over ``examples``."""

    epoch: int
    loss: float
    accuracy: float
    examples: int
    seconds: float
    examples_per_s: float


def native_cpu_bf16() -> bool:
    """True when this CPU computes bf16 in hardware (Intel AMX or AVX512-BF16), where bf16 mixed
    precision trains a small CNN about 1.5x faster than float32; elsewhere bf16 is emulated and slower."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def mixed_precision(device: str | torch.device, *, cuda: bool = True, cpu_bf16: bool = True) -> bool:
    """Whether training on ``device`` should autocast (the ``amp`` of :func:`train_one_epoch`):
    ``cuda`` on a GPU; on the CPU, ``cpu_bf16`` and a CPU with native bf16 (:func:`native_cpu_bf16`)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return bool(cuda)
    return kind == "cpu" and bool(cpu_bf16) and native_cpu_bf16()


def _autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """On CUDA bf16 where the GPU supports it, else fp16; on the CPU bf16; ``None`` (no autocast)
    without ``amp`` or on other devices."""
    if not amp or device.type not in ("cuda", "cpu"):
        return None
    if device.type == "cpu":
        return torch.bfloat16
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _count_correct(logits: Tensor, y: Any) -> int | None:
    """Top-1 hits for hard ``(B,)`` labels or soft ``(B, K)`` targets (argmax); ``None`` otherwise."""
    if not isinstance(y, Tensor):
        return None
    if y.ndim == 1 and not y.is_floating_point():
        return int((logits.argmax(1) == y).sum())
    if y.shape == logits.shape:
        return int((logits.argmax(1) == y.argmax(1)).sum())
    return None


def _to_device(y: Any, device: torch.device) -> Any:
    if isinstance(y, Tensor):
        return y.to(device, non_blocking=True)
    if isinstance(y, tuple | list):
        return type(y)(_to_device(v, device) for v in y)
    return y


class _BufferGuard:
    """Snapshot of a model's buffers (e.g. BatchNorm running stats) to undo a failed forward pass."""

    def __init__(self, model: nn.Module) -> None:
        self.buffers = list(model.buffers())
        self.backup = [b.detach().clone() for b in self.buffers]

    def save(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.backup, self.buffers)

    def restore(self) -> None:
        if self.buffers:
            torch._foreach_copy_(self.buffers, self.backup)


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Any]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    *,
    epoch: int,
    device: str | torch.device = "cpu",
    label_smoothing: float = 0.0,
    amp: bool = False,
    grad_scaler: torch.amp.GradScaler | None = None,
    loss_fn: Callable[[Tensor, Any], Tensor] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> EpochResult:
    """Train ``model`` (already on ``device``) for one pass over ``batches`` of ``(x (B, C, H, W), y)``.

    The loss is ``loss_fn(logits (B, K) float32, y)`` if given, else cross-entropy with
    ``label_smoothing`` against int64 ``y (B,)``.  ``scheduler`` (may be ``None``) is stepped per
    batch.  ``on_step(step, loss)`` is called after each optimizer step, ``step`` counting batches
    of this epoch from 0.  A NaN/Inf loss raises :class:`NonFiniteLossError` *before* the backward
    pass and optimizer step, so parameters and buffers (BatchNorm statistics) are those after the
    previous step.
    ``amp`` autocasts the forward pass: on CUDA bf16 if supported, else fp16 with ``grad_scaler``
    (created here if not given); on the CPU bf16 (fast only where :func:`native_cpu_bf16`; decide
    with :func:`mixed_precision`). The loss is always computed in float32.  Accuracy uses ``y`` when it is hard labels or soft
    ``(B, K)`` targets, and is NaN otherwise.
    """
    dev = torch.device(device)
    amp_dtype = _autocast_dtype(dev, amp)
    scaler = None
    if amp_dtype == torch.float16:
        scaler = grad_scaler if grad_scaler is not None else torch.amp.GradScaler("cuda")
    model.train()
    loss_sum, correct, scored, examples = 0.0, 0, 0, 0
    start = time.perf_counter()
    guard = _BufferGuard(model)
    for step, (x_in, y_in) in enumerate(batches):
        x, y = x_in.to(dev, non_blocking=True), _to_device(y_in, dev)
        guard.save()
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(x)
        logits = logits.float()  # (B, K)
        if loss_fn is not None:
            loss = loss_fn(logits, y)
        else:
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        value = float(loss.detach())
        if not math.isfinite(value):
            guard.restore()  # undo the running-stat updates of the failed forward pass
            raise NonFiniteLossError(epoch, step, value)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        batch = x.shape[0]
        examples += batch
        loss_sum += value * batch
        hits = _count_correct(logits.detach(), y)
        if hits is not None:
            correct, scored = correct + hits, scored + batch
        if on_step is not None:
            on_step(step, value)
    if examples == 0:
        raise ValueError(f"epoch {epoch} had no batches")
    seconds = time.perf_counter() - start
    accuracy = correct / scored if scored else float("nan")
    return EpochResult(
        epoch, loss_sum / examples, accuracy, examples, seconds, examples / max(seconds, 1e-12)
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    device: str | torch.device = "cpu",
    topk: tuple[int, ...] = (1, 5),
) -> dict[str, float]:
    """Mean cross-entropy and top-k accuracy over ``batches`` of ``(x (B, C, H, W), y (B,) int64)``.

    Returns ``{"loss", "top<k>" for each k, "examples"}``; ``k`` is clipped to the number of
    classes (so ``top5`` is 1.0 with 3 classes).  Runs in eval mode; the training flag is restored.
    """
    if not topk or min(topk) < 1:
        raise ValueError(f"topk must be a non-empty tuple of ints >= 1, got {topk}")
    dev = torch.device(device)
    was_training = model.training
    model.eval()
    loss_sum, examples = 0.0, 0
    hits = dict.fromkeys(topk, 0)
    try:
        for x_in, y_in in batches:
            x, y = x_in.to(dev, non_blocking=True), y_in.to(dev, non_blocking=True).long()
            logits = model(x).float()  # (B, K)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            maxk = min(max(topk), logits.shape[1])
            top = logits.topk(maxk, dim=1).indices == y[:, None]  # (B, maxk) bool
            for k in topk:
                hits[k] += int(top[:, : min(k, maxk)].any(dim=1).sum())
            examples += x.shape[0]
    finally:
        model.train(was_training)
    if examples == 0:
        raise ValueError("no batches to evaluate")
    result = {"loss": loss_sum / examples}
    result.update({f"top{k}": hits[k] / examples for k in topk})
    result["examples"] = float(examples)
    return result


class EarlyStopping:
    """Stop when the monitored value has not improved by more than ``min_delta`` for ``patience`` steps.

    ``mode="min"`` (e.g. validation loss) or ``"max"`` (e.g. accuracy).  NaN never improves.
    ``step(value)`` returns ``True`` once ``patience`` consecutive non-improving values were seen
    (``patience=0``: stop at the first non-improvement).  ``best`` / ``best_epoch`` track the best
    value and the epoch it came from (``-1`` before any step).
    """

    def __init__(self, patience: int = 10, min_delta: float = 0.0, mode: str = "min") -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if patience < 0 or min_delta < 0:
            raise ValueError(f"need patience >= 0 and min_delta >= 0, got {patience}, {min_delta}")
        self.mode = mode
        self.patience = patience
        self.min_delta = min_delta
        self.best = math.inf if mode == "min" else -math.inf
        self.best_epoch = -1
        self.num_bad_epochs = 0
        self.epochs_seen = 0

    @property
    def should_stop(self) -> bool:
        """``True`` once ``patience`` (at least one) consecutive non-improving values were seen."""
        return self.num_bad_epochs > 0 and self.num_bad_epochs >= self.patience

    def improves(self, value: float) -> bool:
        """Whether ``value`` beats ``best`` by more than ``min_delta``."""
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def step(self, value: float, epoch: int | None = None) -> bool:
        """Record ``value`` for ``epoch`` (default: the number of previous steps); ``True`` = stop."""
        epoch = self.epochs_seen if epoch is None else epoch
        self.epochs_seen = max(self.epochs_seen + 1, epoch + 1)
        if self.improves(float(value)):
            self.best, self.best_epoch, self.num_bad_epochs = float(value), epoch, 0
        else:
            self.num_bad_epochs += 1
        return self.should_stop

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python state (JSON-friendly apart from +-inf before the first step)."""
        return {
            "mode": self.mode,
            "patience": self.patience,
            "min_delta": self.min_delta,
            "best": self.best,
            "best_epoch": self.best_epoch,
            "num_bad_epochs": self.num_bad_epochs,
            "epochs_seen": self.epochs_seen,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore progress (``best``, ``best_epoch``, counters); ``patience``/``min_delta`` stay as constructed."""
        if state["mode"] != self.mode:
            raise ValueError(
                f"state was saved with mode={state['mode']!r}, this instance has mode={self.mode!r}"
            )
        self.best = float(state["best"])
        self.best_epoch = int(state["best_epoch"])
        self.num_bad_epochs = int(state["num_bad_epochs"])
        self.epochs_seen = int(state["epochs_seen"])
