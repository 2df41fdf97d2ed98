"""Data-free distillation: train a DAFL generator against the frozen teacher, then distill the
student on generated images only (:mod:`distill.data_free` holds the generator and its losses).

The generator (:class:`distill.data_free.Generator`, ``latent_dim`` noise -> ``image_shape``
images in ``[0, 1]``) minimises :func:`distill.data_free.dafl_generator_loss` (one-hot +
activation + information-entropy) plus ``w_bn`` times the BatchNorm-statistics prior
(:class:`distill.data_free.BatchNormPrior`: it pulls samples towards the statistics of the
teacher's training data, which the student's own BatchNorm then sees; ``w_bn=0`` is plain DAFL,
and teachers without BatchNorm get plain DAFL), with Adam at ``generator_lr``. The teacher runs
:func:`distill.data_free.frozen`; its mode and ``requires_grad`` flags are restored at the end.

The student (train mode, AdamW at ``lr`` with cosine decay to 0 over ``student_steps``)
minimises :func:`distill.losses.soft_target_loss`, ``T^2 * KL(target_T || softmax(z_s / T))``,
on generated batches, where the target is ``teacher_probs(images)`` (probabilities at T=1, e.g.
the specialist ensemble's ``q``, softened as ``softmax(log q / T)``) when given, else the
teacher's logits. The student never sees real data, and its BatchNorm statistics come from
generated images. Its training flag is restored.

``schedule="sequential"`` (the default) trains the generator first, then the student on fresh
samples of the final generator (the first student step reuses the last generator batch).
``schedule="alternate"`` (DAFL's way) interleaves the steps evenly over the run (with equal
counts: G, S, G, S, ...); a student step reuses the batch the preceding generator step made
(and that step's teacher logits). On 320-class glyphs at equal budget the sequential student
was far better (16% vs 2% top-1 for G=60, S=300), since early students chase a generator that
still makes noise.

Budget, measured on one CPU thread (320-class 32x32 glyphs, a ``cnn_fast`` teacher at 92% test
top-1, a ``cnn`` width-0.5 student, T=4): G=200, S=600, batch 64, lr 1e-2 reach 54-58% test
top-1 (two seeds) in about 2 minutes. The student lr matters most (G=60, S=300, batch 128: 16%
at lr 3e-3, 32% at 6e-3, 35% at 1e-2), then the number of student and generator steps, and the
BatchNorm prior (16% -> 10% without it).

:class:`DataFreeTrainer` holds every piece of training state and exposes it through
``state_dict()`` / ``load_state_dict()`` (tensors and plain Python: ``torch.save`` it, read it
back with ``torch.load(weights_only=True)``); its ``on_chunk`` callback runs after each chunk
of work, where a caller can checkpoint. A resumed run gives the same numbers as an
uninterrupted one. :func:`distill_data_free` is the one-call form.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from distill.data_free import (
    BatchNormPrior,
    Generator,
    default_feature_path,
    frozen,
    train_generator_step,
)
from distill.features import CAPTURE_MODES, FeatureExtractor
from distill.losses import soft_target_loss
from distill.targets import check_temperature

__all__ = ["SCHEDULES", "DataFreeSettings", "DataFreeTrainer", "distill_data_free"]

SCHEDULES = ("alternate", "sequential")
# Settings that only change when callbacks run, not the numbers: a state saved with other
# values of these can be resumed.
_NOT_IN_STATE = ("progress_every", "chunk_steps")


def _check_int(what: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")


def _check_positive(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 < value < math.inf):
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class DataFreeSettings:
    """Everything that shapes a data-free distillation run except the models; validated on
    creation (ValueError naming the field)."""

    image_shape: tuple[int, int, int]  # (C, H, W) of the teacher's inputs
    num_classes: int  # K, the logits of teacher and student (>= 2)
    generator_steps: int  # generator updates (>= 0; 0 distills on an untrained generator)
    student_steps: int  # student updates (>= 1)
    batch_size: int  # generated images per step (>= 2: BatchNorm and the entropy loss need a batch)
    latent_dim: int  # noise dimension of the generator
    temperature: float  # KD temperature T > 0
    lr: float  # student AdamW learning rate, cosine-decayed to 0 over student_steps
    seed: int  # the generator's initial weights and its noise (drawn without touching the global RNG)
    feature_path: str | None = None  # teacher module of the pre-FC features; None: the input of its last nn.Linear
    feature_capture: str = "input"  # "input" or "output" of feature_path (unused when it is None)
    schedule: str = "sequential"  # "sequential" or "alternate", see the module docstring
    generator_lr: float = 2e-3  # generator Adam lr (2e-3: 0.61 vs 0.28 test top-1 for 2e-2 on 9 classes)
    generator_hidden_channels: int = 32  # generator width (DAFL: 128, ~10x the compute)
    weight_decay: float = 0.0  # student AdamW weight decay
    w_onehot: float = 1.0  # generator loss weights (DAFL: 1, 0.1, 5)
    w_activation: float = 0.1
    w_entropy: float = 5.0
    w_bn: float = 1.0  # weight of the BatchNorm-statistics prior (0: plain DAFL)
    histogram_samples: int = 2048  # fresh samples of the final generator for class_histogram
    progress_every: int = 10  # on_progress period in steps (and at each phase's last step)
    chunk_steps: int | None = None  # student steps between on_chunk calls (None: at phase ends only)

    def __post_init__(self) -> None:
        shape = self.image_shape
        if not isinstance(shape, tuple | list) or len(shape) != 3 or any(
                isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in shape):
            raise ValueError(f"image_shape must be (C, H, W) positive ints, e.g. (1, 32, 32), got {shape!r}")
        object.__setattr__(self, "image_shape", tuple(shape))
        _check_int("num_classes", self.num_classes, 2)
        _check_int("generator_steps", self.generator_steps, 0)
        _check_int("student_steps", self.student_steps)
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 2:
            raise ValueError(f"batch_size must be an int >= 2 (the generator's BatchNorm and the entropy "
                             f"loss need a batch), got {self.batch_size!r}")
        _check_int("latent_dim", self.latent_dim)
        check_temperature(self.temperature)
        _check_positive("lr", self.lr)
        _check_positive("generator_lr", self.generator_lr)
        if self.feature_capture not in CAPTURE_MODES:
            raise ValueError(f"feature_capture must be one of {CAPTURE_MODES}, got {self.feature_capture!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.w_bn >= 0:
            raise ValueError(f"w_bn must be >= 0 (0 turns the BatchNorm prior off), got {self.w_bn!r}")
        _check_int("progress_every", self.progress_every)
        if self.chunk_steps is not None:
            _check_int("chunk_steps", self.chunk_steps)


def _cosine(step: int, total: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def _num_upsamples(height: int, width: int, most: int = 2) -> int:
    """Largest ``n <= most`` with ``2**n`` dividing both sides."""
    n = 0
    while n < most and height % 2 ** (n + 1) == 0 and width % 2 ** (n + 1) == 0:
        n += 1
    return n


def _check_logits(what: str, logits: object, batch: int, num_classes: int) -> Tensor:
    if not isinstance(logits, Tensor) or tuple(logits.shape) != (batch, num_classes):
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"the {what} must return (B, num_classes)=({batch}, {num_classes}) logits on "
            f"generated images, got {got}; check num_classes and that the model returns "
            "plain logits"
        )
    return logits.float()


def _build_generator(settings: DataFreeSettings, device: torch.device) -> Generator:
    """The generator, initialised from ``settings.seed`` without touching the global RNG."""
    c, h, w = settings.image_shape
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(settings.seed)
        generator = Generator(settings.latent_dim, (c, h, w), hidden_channels=settings.generator_hidden_channels,
                              num_upsamples=_num_upsamples(h, w))
    return generator.to(device)


def _teacher_features(settings: DataFreeSettings, teacher: nn.Module) -> tuple[str, str]:
    """``(module path, capture)`` of the teacher's pre-FC features; an unknown path raises here."""
    if settings.feature_path is None:
        path, capture = default_feature_path(teacher), "input"
    else:
        path, capture = settings.feature_path, settings.feature_capture
    FeatureExtractor(teacher, [path], capture=capture)  # validates the path
    return path, capture


def _bn_prior(settings: DataFreeSettings, teacher: nn.Module) -> BatchNormPrior | None:
    prior = BatchNormPrior(teacher) if settings.w_bn > 0 else None
    return prior if prior is not None and prior.layers else None  # no statistics to match: plain DAFL


def _generator_turn(settings: DataFreeSettings, g: int, s: int) -> bool:
    """Whether step ``g + s + 1`` of the schedule is a generator step (``g``, ``s`` done so far):
    the next generator step is at "time" ``(g + 1) / G``, the next student step at ``(s + 1) / S``."""
    total_g, total_s = settings.generator_steps, settings.student_steps
    if g >= total_g:
        return False
    if settings.schedule == "sequential":
        return True
    return s >= total_s or (g + 1) * total_s <= (s + 1) * total_g


class DataFreeTrainer:
    """The data-free distillation run of ``student`` from the frozen ``teacher`` (see the module
    docstring), resumable: :meth:`run` continues from wherever :meth:`load_state_dict` put it.

    Args:
        settings: the run's :class:`DataFreeSettings`.
        teacher: frozen classifier; ``teacher(x)`` returns ``(B, num_classes)`` logits.
        student: the model being trained, same logit shape.  Both are moved to ``device``
            in place.
        device: where the three models run.
        teacher_probs: optional ``images (B, C, H, W) -> (B, K)`` probabilities used as
            distillation targets instead of the teacher's logits (called under ``no_grad``).
            The generator is still trained against ``teacher``.
        on_progress: ``on_progress(phase, step, metrics)`` every ``progress_every`` steps of
            each phase and at its last step; ``phase`` is ``"generator"`` (metrics ``loss``,
            ``onehot``, ``activation``, ``entropy`` and ``bn`` when the prior is on) or
            ``"student"`` (``kd``, ``agreement``, ``lr``); ``step`` counts from 1.
        on_chunk: ``on_chunk(trainer)`` after the generator's last step and after every
            ``chunk_steps`` student steps (and the last one): save ``trainer.state_dict()`` there.
    """

    def __init__(self, settings: DataFreeSettings, teacher: nn.Module, student: nn.Module, *,
                 device: torch.device | str = "cpu",
                 teacher_probs: Callable[[Tensor], Tensor] | None = None,
                 on_progress: Callable[[str, int, dict[str, float]], None] | None = None,
                 on_chunk: Callable[[DataFreeTrainer], None] | None = None) -> None:
        self.settings, self.device = settings, torch.device(device)
        self.teacher, self.student = teacher.to(self.device), student.to(self.device)
        self.teacher_probs, self.on_progress, self.on_chunk = teacher_probs, on_progress, on_chunk
        self.feature_path, self.feature_capture = _teacher_features(settings, teacher)
        self.generator = _build_generator(settings, self.device)
        self.noise_rng = torch.Generator(device=self.device).manual_seed(settings.seed)
        self.generator_optimizer = torch.optim.Adam(self.generator.parameters(), lr=settings.generator_lr)
        params = [p for p in student.parameters() if p.requires_grad]
        if not params:
            raise ValueError("student has no trainable parameters (requires_grad is False everywhere)")
        self.student_optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
        self.student_scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.student_optimizer, lambda step: _cosine(step, settings.student_steps))
        self.bn_prior = _bn_prior(settings, teacher)
        self.generator_steps_done = self.student_steps_done = 0
        self.pending: tuple[Tensor, Tensor] | None = None  # last generator batch: (images, teacher logits)
        generator_terms = ["loss", "onehot", "activation", "entropy"] + ["bn"] * (self.bn_prior is not None)
        self.log: dict[str, dict[str, list]] = {
            "generator": {k: [] for k in ["step", *generator_terms]},
            "student": {k: [] for k in ("step", "kd", "agreement", "lr")},
        }
        self.transfer_histogram = torch.zeros(settings.num_classes, dtype=torch.long, device=self.device)
        self.seconds = {"generator": 0.0, "student": 0.0, "total": 0.0}

    @property
    def finished(self) -> bool:
        s = self.settings
        return self.generator_steps_done >= s.generator_steps and self.student_steps_done >= s.student_steps

    def run(self) -> dict[str, Any]:
        """Train until both phases are done; returns the history (see :func:`distill_data_free`)."""
        started, total_before = time.perf_counter(), self.seconds["total"]
        with frozen(self.teacher):
            was_training = self.student.training
            try:
                while not self.finished:
                    chunk_done = self._next_step()
                    self.seconds["total"] = total_before + time.perf_counter() - started
                    if chunk_done and self.on_chunk is not None:
                        self.on_chunk(self)
                histogram = self._class_histogram()
            finally:
                self.student.train(was_training)
        self.seconds["total"] = total_before + time.perf_counter() - started
        return self._history(histogram)

    def _next_step(self) -> bool:
        """Take the schedule's next step; True when it ends a chunk: the generator's last step,
        every ``chunk_steps`` student steps, the student's last step."""
        s = self.settings
        if _generator_turn(s, self.generator_steps_done, self.student_steps_done):
            self._generator_step()
            return self.generator_steps_done == s.generator_steps
        self._student_step()
        done = self.student_steps_done
        return done == s.student_steps or (s.chunk_steps is not None and done % s.chunk_steps == 0)

    def _generator_step(self) -> None:
        s, start = self.settings, time.perf_counter()
        step = train_generator_step(
            self.generator, self.teacher, self.generator_optimizer, s.batch_size,
            feature_path=self.feature_path, feature_capture=self.feature_capture, w_onehot=s.w_onehot,
            w_activation=s.w_activation, w_entropy=s.w_entropy, bn_prior=self.bn_prior, w_bn=s.w_bn,
            rng=self.noise_rng)
        _check_logits("teacher", step.logits, s.batch_size, s.num_classes)
        self.pending = (step.images, step.logits)
        self.generator_steps_done += 1
        metrics = {"loss": float(step.loss)} | {k: float(v) for k, v in step.terms.items()}
        self.seconds["generator"] += time.perf_counter() - start
        self._record("generator", self.generator_steps_done, metrics, s.generator_steps)

    @torch.no_grad()
    def _fresh_batch(self) -> tuple[Tensor, Tensor | None]:
        """``(images (B, C, H, W), teacher logits (B, K) or None when teacher_probs gives the targets)``."""
        self.generator.train()  # the batch statistics the generator was trained with
        images = self.generator.sample(self.settings.batch_size, generator=self.noise_rng)
        if self.teacher_probs is not None:
            return images, None
        return images, _check_logits("teacher", self.teacher(images), self.settings.batch_size,
                                     self.settings.num_classes)

    def _student_step(self) -> None:
        s, start = self.settings, time.perf_counter()
        images, logits_t = self.pending if self.pending is not None else self._fresh_batch()
        self.pending = None
        self.student.train()
        if self.teacher_probs is not None:
            with torch.no_grad():
                target = self.teacher_probs(images)  # (B, K) probabilities
            teacher = {"teacher_probs": target}
        else:
            assert logits_t is not None
            target, teacher = logits_t, {"teacher_logits": logits_t}
        logits_s = _check_logits("student", self.student(images), s.batch_size, s.num_classes)
        loss = soft_target_loss(logits_s, temperature=s.temperature, **teacher)
        step = self.student_steps_done + 1
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite distillation loss at student step {step}; lower lr (now {s.lr})")
        self.student_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.student_optimizer.step()
        current_lr = self.student_optimizer.param_groups[0]["lr"]
        self.student_scheduler.step()
        target_top = target.argmax(dim=1)  # (B,)
        self.transfer_histogram.add_(torch.bincount(target_top, minlength=s.num_classes))
        metrics = {"kd": float(loss.detach()),
                   "agreement": float((logits_s.detach().argmax(dim=1) == target_top).float().mean()),
                   "lr": float(current_lr)}
        self.student_steps_done = step
        self.seconds["student"] += time.perf_counter() - start
        self._record("student", step, metrics, s.student_steps)

    def _record(self, phase: str, step: int, metrics: dict[str, float], total: int) -> None:
        log = self.log[phase]
        log["step"].append(step)
        for key, value in metrics.items():
            log[key].append(value)
        if self.on_progress is not None and (step % self.settings.progress_every == 0 or step == total):
            self.on_progress(phase, step, metrics)

    @torch.no_grad()
    def _class_histogram(self) -> Tensor:
        """``(K,)`` teacher arg-max counts on fresh samples of the final generator."""
        s = self.settings
        histogram = torch.zeros(s.num_classes, dtype=torch.long, device=self.device)
        self.generator.train()
        for _ in range(max(1, math.ceil(s.histogram_samples / s.batch_size))):
            top = self.teacher(self.generator.sample(s.batch_size, generator=self.noise_rng)).argmax(dim=1)
            histogram.add_(torch.bincount(top, minlength=s.num_classes))
        return histogram

    def _history(self, histogram: Tensor) -> dict[str, Any]:
        return {
            "schedule": self.settings.schedule,
            "feature_path": self.feature_path,
            "feature_capture": self.feature_capture,
            "bn_prior_layers": len(self.bn_prior.layers) if self.bn_prior is not None else 0,
            "generator": self.log["generator"],
            "student": self.log["student"],
            "class_histogram": histogram.cpu().tolist(),
            "classes_covered": int((histogram > 0).sum()),
            "transfer_histogram": self.transfer_histogram.cpu().tolist(),
            "seconds": dict(self.seconds),
        }

    def state_dict(self) -> dict[str, Any]:
        """Every piece of training state, as tensors and plain Python (``torch.save`` it; it reads
        back with ``torch.load(weights_only=True)``). Like ``nn.Module.state_dict`` it holds
        references: serialise it before training on."""
        cuda = self.device.type == "cuda"
        pending = None if self.pending is None else {"images": self.pending[0], "logits": self.pending[1]}
        return {
            "settings": {k: v for k, v in dataclasses.asdict(self.settings).items() if k not in _NOT_IN_STATE},
            "generator": self.generator.state_dict(),
            "student": self.student.state_dict(),
            "generator_optimizer": self.generator_optimizer.state_dict(),
            "student_optimizer": self.student_optimizer.state_dict(),
            "student_scheduler": self.student_scheduler.state_dict(),
            "generator_steps_done": self.generator_steps_done,
            "student_steps_done": self.student_steps_done,
            "noise_rng": self.noise_rng.get_state(),
            "torch_rng": torch.get_rng_state(),  # the student's dropout, if any, draws from it
            "cuda_rng": torch.cuda.get_rng_state(self.device) if cuda else None,
            "pending": pending,
            "log": self.log,
            "transfer_histogram": self.transfer_histogram,
            "seconds": dict(self.seconds),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict`, built with the same settings and
        models); restores the global torch RNG too. ValueError if the settings differ."""
        ours = {k: v for k, v in dataclasses.asdict(self.settings).items() if k not in _NOT_IN_STATE}
        changed = sorted(k for k in ours.keys() | state["settings"].keys()
                         if ours.get(k) != state["settings"].get(k))
        if changed:
            shown = ", ".join(f"{k}={state['settings'].get(k)!r} (now {ours.get(k)!r})" for k in changed)
            raise ValueError(f"the data-free state was saved with other settings: {shown}; "
                             "resume with the same settings or start afresh")
        self.generator.load_state_dict(state["generator"])
        self.student.load_state_dict(state["student"])
        self.generator_optimizer.load_state_dict(state["generator_optimizer"])
        self.student_optimizer.load_state_dict(state["student_optimizer"])
        self.student_scheduler.load_state_dict(state["student_scheduler"])
        self.generator_steps_done = int(state["generator_steps_done"])
        self.student_steps_done = int(state["student_steps_done"])
        self.noise_rng.set_state(state["noise_rng"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        pending = state["pending"]
        self.pending = None if pending is None else (pending["images"].to(self.device),
                                                     pending["logits"].to(self.device))
        self.log = {phase: {k: list(v) for k, v in log.items()} for phase, log in state["log"].items()}
        self.transfer_histogram = state["transfer_histogram"].to(self.device).clone()
        self.seconds = dict(state["seconds"])


def distill_data_free(
    teacher: nn.Module,
    student: nn.Module,
    settings: DataFreeSettings,
    *,
    device: torch.device | str = "cpu",
    teacher_probs: Callable[[Tensor], Tensor] | None = None,
    on_progress: Callable[[str, int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Data-free distillation (DAFL) of ``student`` from the frozen ``teacher`` in one call:
    :class:`DataFreeTrainer` (same arguments) run from the start.

    Returns:
        A JSON-serialisable history::

            {"schedule", "feature_path", "feature_capture",
             "bn_prior_layers": int,       # teacher BatchNorm layers in the prior (0: off)
             "generator": {"step", "loss", "onehot", "activation", "entropy", "bn"},  # lists
             "student": {"step", "kd", "agreement", "lr"},                       # lists
             "class_histogram": [K ints],  # teacher arg-max on the final generator's samples
             "classes_covered": int,       # non-zero bins of class_histogram
             "transfer_histogram": [K ints],  # target arg-max over every student batch
             "seconds": {"generator", "student", "total"}}

        ``agreement`` is the fraction of a batch where the student's arg-max matches
        the target's.

    Raises:
        ValueError: models whose logits are not ``(B, K)``, an unknown ``feature_path``, or
            probabilities that are not (bad settings already fail in :class:`DataFreeSettings`).
        FloatingPointError: a non-finite loss (lower ``lr`` / ``generator_lr``).
    """
    trainer = DataFreeTrainer(settings, teacher, student, device=device, teacher_probs=teacher_probs,
                              on_progress=on_progress)
    return trainer.run()
