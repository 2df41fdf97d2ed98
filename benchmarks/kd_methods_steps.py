"""The side-by-side parts of ``benchmarks.kd_methods``: the training cost per step of every method
relative to plain KD, and one student trained with torchdistill's KD loss beside one with ours.

Cost: for each method the student, objective and teacher the distill stage would build (from the
teacher run's config plus the method's overrides; the teacher is the soft-target cache plus the
generalist's activations); after a warm-up, every round draws one batch of training examples and
runs one step of every method on it, in rotating order. A method's cost is the median over rounds
of its step time divided by KD's on the same batch. A scheme's step is one batch through every
model it trains: mutual learning's group, each born-again generation (generalist architecture,
taught by a network), the assistant and then the student taught by it. Factor transfer's
paraphraser training, which runs once before the student's, is not part of its step.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from distill.losses import kd_loss
from distill.schemes import MutualGroup, mutual_one_epoch
from distill.train import (
    IndexedBatch,
    build_objective,
    distill_one_epoch,
    evaluate_predictor,
    feature_pairs,
    iterate_indexed_batches,
    make_teacher,
    pair_paths,
    probe_feature_shapes,
)
from generalist.data import create_dataset
from generalist.train import build_optimizer, set_seed, train_one_epoch
from orchestration.artifacts import cache_dir, load_generalist
from orchestration.builders import optimizer_and_schedule
from orchestration.checkpoints import build_model
from orchestration.config import load_config
from specialists.ensemble import SoftTargetCache

Step = Callable[[IndexedBatch], None]


class Setup:
    """A teacher run's data, generalist, cache and the student's architecture."""

    def __init__(self, run: Path, student_overrides: Sequence[str]) -> None:
        self.run, self.student_overrides = run, list(student_overrides)
        self.config = load_config(run / "config.yaml", self.student_overrides)
        data = self.config.data
        self.data = create_dataset(data.name, root=data.root, seed=self.config.run.seed, **data.options)
        self.generalist, meta = load_generalist(run)
        self.generalist_spec = dict(meta["model"])
        self.cache = SoftTargetCache(cache_dir(run))
        channels, height, _ = self.data.image_shape
        d = self.config.distill
        self.spec = {"name": d.student, "num_classes": self.data.num_classes, "in_channels": channels,
                     "image_size": height, "width": d.width, "depth": d.depth}

    def probs(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.cache.targets(ids, 1.0).to(x.device)


def _optimizer(module: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    """The students' optimizer (``distill.optimizer``) without its schedule: the step's cost is the same."""
    o = cfg.optimizer
    return build_optimizer(module, o.name, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum)


def _kd_step(setup: Setup, overrides: Sequence[str], spec: dict[str, Any], teach=None) -> Step:
    """One distill-stage step of a student of ``spec`` with the method's objective."""
    cfg = load_config(setup.run / "config.yaml", [*setup.student_overrides, *overrides]).distill
    set_seed(0)
    student = build_model(spec)
    pairs = feature_pairs(cfg.losses, cfg.hint_layers, term_layers=cfg.layers)
    x = setup.data.train.images[:4].float() / 255.0
    s_paths, t_paths = pair_paths(pairs)
    objective = build_objective(
        temperature=cfg.temperature, alpha=cfg.alpha, losses=cfg.losses, pairs=pairs,
        student_shapes=probe_feature_shapes(student, s_paths, x),
        teacher_shapes=probe_feature_shapes(setup.generalist, t_paths, x),
        options=cfg.loss_options, num_examples=len(setup.data.train))
    teacher = teach or make_teacher(probs_fn=setup.probs, feature_model=setup.generalist, feature_paths=t_paths)
    optimizer = _optimizer(torch.nn.ModuleDict({"s": student, "o": objective}), cfg)

    def step(batch: IndexedBatch) -> None:
        distill_one_epoch(student, [batch], optimizer, None, objective=objective, teacher=teacher, epoch=0)

    return step


def _scheme_steps(setup: Setup, name: str, overrides: Sequence[str]) -> list[Step]:
    cfg = load_config(setup.run / "config.yaml", [*setup.student_overrides, *overrides]).distill
    plain = [o for o in overrides if not o.startswith("distill.scheme")]
    if name == "mutual":
        set_seed(0)
        group = MutualGroup([build_model(setup.spec) for _ in range(cfg.schemes.group_size)])
        optimizer = _optimizer(group, cfg)
        return [lambda b: mutual_one_epoch(group, [(b.x, b.y)], optimizer, None,
                                           temperature=cfg.schemes.mutual_temperature)]
    if name == "born_again":
        teachers = [setup.generalist] + [build_model(setup.generalist_spec).eval()
                                         for _ in range(cfg.schemes.generations - 1)]
        return [_kd_step(setup, plain, setup.generalist_spec, make_teacher(logits_model=t)) for t in teachers]
    width = (cfg.width + setup.config.generalist.width) / 2
    assistant = {**setup.spec, "width": cfg.schemes.assistant_width or width}
    taught = make_teacher(logits_model=build_model(assistant).eval())
    return [_kd_step(setup, plain, assistant), _kd_step(setup, plain, setup.spec, taught)]


def _variants(setup: Setup, methods: dict[str, Sequence[str]]) -> dict[str, list[Step]]:
    schemes = ("mutual", "born_again", "teacher_assistant")
    return {name: _scheme_steps(setup, name, o) if name in schemes else [_kd_step(setup, o, setup.spec)]
            for name, o in methods.items()}


def time_steps(setup: Setup, methods: dict[str, Sequence[str]], rounds: int) -> dict[str, Any]:
    """Median step seconds of each method and its median per-batch ratio to KD's."""
    variants = _variants(setup, methods)
    names = list(variants)
    gen = torch.Generator().manual_seed(0)
    images, labels = setup.data.train.images, setup.data.train.labels
    batch = setup.config.distill.batch_size
    wall: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds + 2):                       # two warm-up rounds, not kept
        ids = torch.randperm(images.shape[0], generator=gen)[:batch]
        sample = IndexedBatch(images[ids].float() / 255.0, labels[ids].long(), ids)
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            for step in variants[name]:
                step(sample)
            if r >= 2:
                wall[name].append(time.perf_counter() - start)
    ratios = {n: statistics.median(a / b for a, b in zip(wall[n], wall["kd"], strict=True)) for n in names}
    return {"rounds": rounds, "median_ms": {n: 1e3 * statistics.median(w) for n, w in wall.items()},
            "ratios": ratios}


def _train_with(setup: Setup, loss: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
    """Test top-1 of the student trained with ``loss(logits, labels, q)`` on the cached targets
    (the stage's seed, initial weights, batch order, optimizer and schedule)."""
    cfg, data = setup.config.distill, setup.data
    set_seed(setup.config.run.seed)
    student = build_model(setup.spec)
    steps = math.ceil(len(data.train) / cfg.batch_size)
    optimizer, scheduler = optimizer_and_schedule(student, cfg.optimizer, steps_per_epoch=steps, epochs=cfg.epochs)
    for epoch in range(cfg.epochs):
        batches = ((b.x, (b.y, b.ids)) for b in iterate_indexed_batches(
            data.train.images, data.train.labels, batch_size=cfg.batch_size, shuffle=True,
            seed=setup.config.run.seed, epoch=epoch))
        train_one_epoch(student, batches, optimizer, scheduler, epoch=epoch,
                        loss_fn=lambda logits, t: loss(logits, t[0], setup.cache.targets(t[1], 1.0)))
    student.eval()
    return evaluate_predictor(student, data.test.images, data.test.labels)["top1"]


def compare_torchdistill(setup: Setup, alpha: float) -> dict[str, Any]:
    """The same student trained with torchdistill's KDLoss and with ours (alpha = our soft weight)."""
    try:
        import torchdistill
        from torchdistill.losses.mid_level import KDLoss
    except ImportError as exc:
        return {"installed": False, "line": f"torchdistill is not installed ({exc}); install the bench extra."}
    temperature = setup.config.distill.temperature
    peer = KDLoss("fc", "output", "fc", "output", temperature=temperature, alpha=1.0 - alpha)

    def our_loss(z: torch.Tensor, y: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return kd_loss(z, y, teacher_probs=q, temperature=temperature, alpha=alpha)

    def their_loss(z: torch.Tensor, y: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return peer({"fc": {"output": z}}, {"fc": {"output": q.log()}}, y)

    gap = _loss_gap(setup, our_loss, their_loss)
    ours, theirs = _train_with(setup, our_loss), _train_with(setup, their_loss)
    line = (f"torchdistill {torchdistill.__version__} `KDLoss` vs ours, same student, start and batches "
            f"(alpha {alpha}, T {temperature}, {setup.config.distill.epochs} epochs, seed "
            f"{setup.config.run.seed}): test top-1 {theirs:.4f} (torchdistill) vs {ours:.4f} (ours); the two "
            f"losses differ by at most {gap:.1e} (relative) on the first epoch's batches at the start"
            + (", so the gap in accuracy is floating-point rounding grown over training." if ours != theirs else "."))
    return {"installed": True, "version": torchdistill.__version__, "ours": ours, "torchdistill": theirs,
            "max_relative_loss_gap": gap, "line": line}


@torch.no_grad()
def _loss_gap(setup: Setup, ours: Callable, theirs: Callable) -> float:
    """Largest relative difference of the two losses over one epoch of batches, initial student."""
    set_seed(setup.config.run.seed)
    student = build_model(setup.spec).eval()
    data, gap = setup.data, 0.0
    for b in iterate_indexed_batches(data.train.images, data.train.labels,
                                     batch_size=setup.config.distill.batch_size, shuffle=True, seed=0):
        z, q = student(b.x), setup.cache.targets(b.ids, 1.0)
        a, t = float(ours(z, b.y, q)), float(theirs(z, b.y, q))
        gap = max(gap, abs(a - t) / max(abs(t), 1e-12))
    return gap


def measure_steps(run: Path, methods: dict[str, Sequence[str]], student_overrides: Sequence[str], *,
                  quick: bool) -> dict[str, Any]:
    """Cost per step of every method (one thread, side by side) and the torchdistill comparison."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        setup = Setup(run, student_overrides)
        timing = time_steps(setup, methods, rounds=6 if quick else 20)
        kd_setup = copy.copy(setup)
        kd_setup.config = load_config(run / "config.yaml", [*student_overrides, *methods["kd"]])
        timing["torchdistill"] = compare_torchdistill(kd_setup, alpha=kd_setup.config.distill.alpha)
    finally:
        torch.set_num_threads(threads)
    print("  cost per step vs KD: " + "  ".join(f"{n} {r:.2f}" for n, r in timing["ratios"].items()))
    print(f"  {timing['torchdistill']['line']}", flush=True)
    return timing
