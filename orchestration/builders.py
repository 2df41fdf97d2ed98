"""Config -> plain arguments: the builders that keep config objects out of the components."""

from __future__ import annotations

import math

import torch

from generalist.data import DataBundle
from generalist.data.augment import AugmentSpec, default_augment
from generalist.train import WarmupPlateau, build_optimizer, build_scheduler, native_cpu_bf16
from orchestration.config import AugmentConfig, OptimizerConfig


def optimizer_and_schedule(
    module: torch.nn.Module, cfg: OptimizerConfig, *, steps_per_epoch: int, epochs: int,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimiser of ``module``'s parameters and its per-step schedule, as ``cfg`` describes
    them: warm-up + cosine over ``epochs * steps_per_epoch`` steps, or warm-up + reduce on plateau
    (the loop then calls :func:`generalist.train.plateau_epoch_end` with each holdout loss)."""
    optimizer = build_optimizer(module, cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                momentum=cfg.momentum)
    total = steps_per_epoch * epochs
    warmup = min(int(math.floor(cfg.warmup_epochs * steps_per_epoch)), total)
    if cfg.schedule == "plateau":
        plateau = WarmupPlateau(warmup, factor=cfg.plateau_factor, patience=cfg.plateau_patience)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, plateau)
    return optimizer, build_scheduler(optimizer, total_steps=total, warmup_steps=warmup)


def augment_spec(cfg: AugmentConfig, data: DataBundle, enabled: bool = True) -> AugmentSpec:
    """The training augmentation ``cfg`` describes for ``data`` (``kind: auto`` = what the data set
    declares in its info, else :func:`generalist.data.augment.default_augment` for its channels);
    "none" when the training section switched it off."""
    if not enabled:
        return AugmentSpec(kind="none")
    declared = data.info.get("augment") or default_augment(data.image_shape[0]).kind
    kind = declared if cfg.kind == "auto" else cfg.kind
    return AugmentSpec(kind=kind, rotate=cfg.rotate, scale=cfg.scale, shift=cfg.shift,
                       padding=cfg.padding, flip=cfg.flip)


def precision_note(device: torch.device, amp: bool, cpu_bf16: bool) -> str:
    """How a stage trains, in words for its first line: ``amp`` is what it passes to the training
    loop (:func:`generalist.train.mixed_precision`), ``cpu_bf16`` the run's ``run.cpu_bf16``."""
    if amp:
        if device.type == "cpu":
            return "bf16 mixed precision (this CPU computes bf16 natively; run.cpu_bf16=false for float32)"
        return "mixed precision"
    if device.type == "cpu" and cpu_bf16 and not native_cpu_bf16():
        return "float32 (this CPU has no native bf16)"
    return "float32"
