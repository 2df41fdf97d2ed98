"""Data-free distillation: the DAFL generator and its losses (Chen et al. 2019).

A generator maps noise ``z`` to images that make the frozen teacher (i) confident
(one-hot loss), (ii) strongly activated (activation loss on the features before the
last FC), and (iii) balanced across classes (information-entropy loss).  The student
is then distilled on generated images only, with the soft-target term of
:func:`distill.losses.kd_loss`.

:func:`distill_data_free` is the complete loop (generator training, by default with an
extra BatchNorm-statistics prior from DeepInversion, then student distillation);
:func:`train_generator_step` is one plain-DAFL generator update for callers that run
their own loop.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.features import CAPTURE_MODES, FeatureExtractor
from distill.losses import check_positive, check_temperature, soft_target_loss

__all__ = [
    "SCHEDULES",
    "Generator",
    "activation_loss",
    "dafl_generator_loss",
    "default_feature_path",
    "distill_data_free",
    "information_entropy_loss",
    "onehot_loss",
    "train_generator_step",
]


class Generator(nn.Module):
    """DAFL generator: linear -> BN -> [upsample x2 -> conv3x3 -> BN -> LeakyReLU] * n
    -> conv3x3 -> tanh, rescaled to ``[0, 1]``.

    With ``num_upsamples=2`` and ``hidden_channels=128`` this is the DAFL CIFAR/MNIST
    generator (channels 128 -> 128 -> 64 -> C), except that (a) BatchNorm uses the
    default eps (DAFL passes 0.8 positionally, i.e. as eps) and (b) the final
    affine-free BatchNorm is replaced by ``(tanh + 1) / 2`` so samples live in the
    ``[0, 1]`` pixel range our models expect.

    Args:
        latent_dim: size of the noise vector ``z``.
        out_shape: ``(C, H, W)``; ``H`` and ``W`` must be divisible by
            ``2 ** num_upsamples``.
        hidden_channels: channels after the linear layer (halved in the last block).
        num_upsamples: number of x2 nearest-neighbour upsampling blocks.
    """

    def __init__(
        self,
        latent_dim: int,
        out_shape: tuple[int, int, int],
        *,
        hidden_channels: int = 128,
        num_upsamples: int = 2,
    ) -> None:
        super().__init__()
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive int, got {latent_dim!r}")
        if len(out_shape) != 3 or any(not isinstance(v, int) or v < 1 for v in out_shape):
            raise ValueError(f"out_shape must be (C, H, W) positive ints, got {out_shape!r}")
        if not isinstance(num_upsamples, int) or num_upsamples < 0:
            raise ValueError(f"num_upsamples must be an int >= 0, got {num_upsamples!r}")
        if hidden_channels < 2:
            raise ValueError(f"hidden_channels must be >= 2, got {hidden_channels!r}")
        c, h, w = out_shape
        factor = 2**num_upsamples
        if h % factor or w % factor:
            raise ValueError(
                f"out_shape {out_shape} has H, W not divisible by 2**num_upsamples="
                f"{factor}; pick num_upsamples so that it divides both (or resize outputs)"
            )
        self.latent_dim = latent_dim
        self.out_shape = (c, h, w)
        self.hidden_channels = hidden_channels
        self.init_hw = (h // factor, w // factor)
        self.fc = nn.Linear(latent_dim, hidden_channels * self.init_hw[0] * self.init_hw[1])
        self.bn0 = nn.BatchNorm2d(hidden_channels)
        layers: list[nn.Module] = []
        ch = hidden_channels
        for i in range(num_upsamples):
            out_ch = hidden_channels // 2 if i == num_upsamples - 1 else hidden_channels
            layers += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(ch, out_ch, 3, padding=1),
                nn.BatchNorm2d(out_ch),
                nn.LeakyReLU(0.2),
            ]
            ch = out_ch
        layers += [nn.Conv2d(ch, c, 3, padding=1), nn.Tanh()]
        self.blocks = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        """``(B, latent_dim)`` noise -> ``(B, C, H, W)`` images in ``[0, 1]``."""
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"z must have shape (B, {self.latent_dim}), got {tuple(z.shape)}")
        x = self.fc(z).view(z.shape[0], self.hidden_channels, *self.init_hw)
        return (self.blocks(self.bn0(x)) + 1.0) / 2.0

    def sample(self, batch_size: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``z ~ N(0, I)`` on this module's device and return ``(B, C, H, W)``.

        ``generator`` (a ``torch.Generator``) must live on the same device.
        """
        device = self.fc.weight.device
        z = torch.randn(batch_size, self.latent_dim, device=device, generator=generator)
        return self(z)


def onehot_loss(teacher_logits: Tensor) -> Tensor:
    """``CE(z_t, argmax z_t)``, batch mean: ``(B, K) -> ()``."""
    if teacher_logits.dim() != 2:
        raise ValueError(f"teacher_logits must be (B, K), got {tuple(teacher_logits.shape)}")
    return F.cross_entropy(teacher_logits, teacher_logits.argmax(dim=1))


def activation_loss(teacher_features: Tensor) -> Tensor:
    """``-mean(|f_t|)`` over all elements: ``(B, ...) -> ()``.  Minimising it rewards
    strong activations of the features before the teacher's last FC."""
    return -teacher_features.abs().mean()


def information_entropy_loss(teacher_logits: Tensor) -> Tensor:
    """``-H(mean_b softmax(z_t))`` in nats: ``(B, K) -> ()``.

    Minimal (``-log K``) when the batch-mean class distribution is uniform.  DAFL's
    code uses ``log10``, i.e. its value is this one divided by ``ln 10``.
    """
    if teacher_logits.dim() != 2:
        raise ValueError(f"teacher_logits must be (B, K), got {tuple(teacher_logits.shape)}")
    mean_p = F.softmax(teacher_logits.float(), dim=1).mean(dim=0)
    return torch.special.xlogy(mean_p, mean_p).sum()


def dafl_generator_loss(
    teacher_logits: Tensor,
    teacher_features: Tensor,
    *,
    w_onehot: float = 1.0,
    w_activation: float = 0.1,
    w_entropy: float = 5.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DAFL generator objective for one generated batch.

    Args:
        teacher_logits: ``(B, K)`` teacher logits on generated images.
        teacher_features: ``(B, ...)`` teacher features before the last FC.
        w_onehot, w_activation, w_entropy: term weights (DAFL defaults 1, 0.1, 5).

    Returns:
        ``(total, terms)``: scalar total and detached unweighted terms under
        ``"onehot"``, ``"activation"``, ``"entropy"``.
    """
    if teacher_features.shape[:1] != teacher_logits.shape[:1]:
        raise ValueError(
            f"teacher_logits {tuple(teacher_logits.shape)} and teacher_features "
            f"{tuple(teacher_features.shape)} must share the batch dimension"
        )
    terms = {
        "onehot": onehot_loss(teacher_logits),
        "activation": activation_loss(teacher_features),
        "entropy": information_entropy_loss(teacher_logits),
    }
    total = (
        w_onehot * terms["onehot"]
        + w_activation * terms["activation"]
        + w_entropy * terms["entropy"]
    )
    return total, {name: value.detach() for name, value in terms.items()}


def _check_optimizer(optimizer: torch.optim.Optimizer, teacher: nn.Module) -> None:
    teacher_ids = {id(p) for p in teacher.parameters()}
    for group in optimizer.param_groups:
        if any(id(p) in teacher_ids for p in group["params"]):
            raise ValueError(
                "the optimizer holds teacher parameters; the teacher must stay frozen, "
                "build the optimizer from generator.parameters() only"
            )


def _teacher_outputs(
    teacher: nn.Module, images: Tensor, feature_path: str | None, feature_capture: str
) -> tuple[Tensor, Tensor]:
    if feature_path is None:
        out = teacher(images)
        if not (isinstance(out, tuple | list) and len(out) == 2):
            raise ValueError(
                "with feature_path=None the teacher must return (logits, features); "
                "otherwise pass feature_path='<module before the last FC>'"
            )
        return out[0], out[1]
    with FeatureExtractor(teacher, [feature_path], capture=feature_capture) as extractor:
        logits = teacher(images)
    return logits, extractor.features[feature_path]


def train_generator_step(
    generator: Generator,
    teacher: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    *,
    feature_path: str | None = None,
    feature_capture: str = "output",
    w_onehot: float = 1.0,
    w_activation: float = 0.1,
    w_entropy: float = 5.0,
    rng: torch.Generator | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One DAFL generator update against a frozen teacher.

    The teacher runs in eval mode with ``requires_grad`` disabled on its parameters
    (gradients flow through it to the images only); its training flag and
    ``requires_grad`` flags are restored afterwards.  The generator runs in train mode.

    Args:
        generator: the :class:`Generator` being trained.
        teacher: the frozen teacher; returns ``(B, K)`` logits, or ``(logits,
            features)`` when ``feature_path`` is None.
        optimizer: optimizer over ``generator.parameters()`` only.
        batch_size: number of generated samples (>= 2, BatchNorm needs a batch).
        feature_path: dotted path of the teacher module whose output (or input, with
            ``feature_capture="input"``) is the pre-FC feature tensor, e.g. ``"fc"``
            with ``feature_capture="input"``.
        feature_capture: ``"output"`` or ``"input"``, see :class:`FeatureExtractor`.
        w_onehot, w_activation, w_entropy: see :func:`dafl_generator_loss`.
        rng: optional ``torch.Generator`` (on the generator's device) for ``z``.

    Returns:
        ``(total, terms)`` from :func:`dafl_generator_loss`, detached.
    """
    if not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2 (BatchNorm), got {batch_size!r}")
    if feature_capture not in CAPTURE_MODES:
        raise ValueError(f"feature_capture must be one of {CAPTURE_MODES}, got {feature_capture!r}")
    _check_optimizer(optimizer, teacher)
    was_training = teacher.training
    params = list(teacher.parameters())
    flags = [p.requires_grad for p in params]
    teacher.eval()
    for p in params:
        p.requires_grad_(False)
    generator.train()
    try:
        images = generator.sample(batch_size, generator=rng)
        logits, features = _teacher_outputs(teacher, images, feature_path, feature_capture)
        total, terms = dafl_generator_loss(
            logits, features, w_onehot=w_onehot, w_activation=w_activation, w_entropy=w_entropy
        )
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        teacher.train(was_training)
    return total.detach(), terms


SCHEDULES = ("alternate", "sequential")


def default_feature_path(model: nn.Module) -> str:
    """Dotted path of the last ``nn.Linear`` in ``model.named_modules()`` order.

    Its *input* is the pre-FC feature tensor DAFL's activation loss uses; for a
    :class:`generalist.models.Classifier` this is ``"head"`` (the pooled features).
    """
    path = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            path = name
    if path is None:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer whose input could serve as the "
            "pre-FC features; pass feature_path='<dotted module path>' (with "
            "feature_capture='output' or 'input')"
        )
    return path


def _num_upsamples(height: int, width: int, most: int = 2) -> int:
    """Largest ``n <= most`` with ``2**n`` dividing both sides."""
    n = 0
    while n < most and height % 2 ** (n + 1) == 0 and width % 2 ** (n + 1) == 0:
        n += 1
    return n


def _check_positive_int(what: str, value: object, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")


def _check_arguments(
    image_shape: tuple[int, int, int],
    num_classes: int,
    generator_steps: int,
    student_steps: int,
    batch_size: int,
    latent_dim: int,
    temperature: float,
    lr: float,
    generator_lr: float,
    feature_capture: str,
    schedule: str,
    progress_every: int,
) -> None:
    if (
        not isinstance(image_shape, tuple | list)
        or len(image_shape) != 3
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in image_shape)
    ):
        raise ValueError(
            f"image_shape must be (C, H, W) positive ints, e.g. (1, 32, 32), got {image_shape!r}"
        )
    _check_positive_int("num_classes", num_classes, 2)
    _check_positive_int("generator_steps", generator_steps, 0)
    _check_positive_int("student_steps", student_steps)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(
            f"batch_size must be an int >= 2 (the generator's BatchNorm and the entropy loss "
            f"need a batch), got {batch_size!r}"
        )
    _check_positive_int("latent_dim", latent_dim)
    check_temperature(temperature)
    check_positive("lr", lr)
    check_positive("generator_lr", generator_lr)
    if feature_capture not in CAPTURE_MODES:
        raise ValueError(f"feature_capture must be one of {CAPTURE_MODES}, got {feature_capture!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    _check_positive_int("progress_every", progress_every)


def _cosine(step: int, total: int) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def _check_logits(what: str, logits: object, batch: int, num_classes: int) -> Tensor:
    if not isinstance(logits, Tensor) or tuple(logits.shape) != (batch, num_classes):
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"the {what} must return (B, num_classes)=({batch}, {num_classes}) logits on "
            f"generated images, got {got}; check num_classes and that the model returns "
            "plain logits"
        )
    return logits.float()


class _BatchNormPrior:
    """Forward hooks on a model's ``BatchNorm2d`` layers (with running statistics) that
    record, for every call made with grad enabled, ``||mean_b(x) - running_mean||_2 +
    ||var_b(x) - running_var||_2`` of the layer input ``x`` (DeepInversion's
    feature-statistics prior, Yin et al. 2020).  Calls under ``no_grad`` are not recorded.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [
            m
            for m in model.modules()
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None
        ]
        self.terms: list[Tensor] = []
        self._handles: list = []

    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if torch.is_grad_enabled():
            x = args[0].float()
            mean = x.mean(dim=(0, 2, 3))
            var = x.var(dim=(0, 2, 3), unbiased=False)
            self.terms.append(
                torch.linalg.vector_norm(mean - module.running_mean)
                + torch.linalg.vector_norm(var - module.running_var)
            )

    def __enter__(self) -> _BatchNormPrior:
        self._handles = [m.register_forward_hook(self._hook) for m in self.layers]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def pop(self) -> Tensor | None:
        """Mean of the recorded terms (None if there are none); clears them."""
        if not self.terms:
            return None
        value = torch.stack(self.terms).mean()
        self.terms.clear()
        return value


def distill_data_free(
    teacher: nn.Module,
    student: nn.Module,
    *,
    image_shape: tuple[int, int, int],
    num_classes: int,
    generator_steps: int,
    student_steps: int,
    batch_size: int,
    latent_dim: int,
    temperature: float,
    lr: float,
    seed: int,
    device: torch.device | str = "cpu",
    feature_path: str | None = None,
    feature_capture: str = "input",
    teacher_probs: Callable[[Tensor], Tensor] | None = None,
    on_progress: Callable[[str, int, dict[str, float]], None] | None = None,
    schedule: str = "sequential",
    generator_lr: float = 2e-3,
    generator_hidden_channels: int = 32,
    weight_decay: float = 0.0,
    w_onehot: float = 1.0,
    w_activation: float = 0.1,
    w_entropy: float = 5.0,
    w_bn: float = 1.0,
    histogram_samples: int = 2048,
    progress_every: int = 10,
) -> dict:
    """Data-free distillation (DAFL): train a generator against the frozen ``teacher``,
    then distill ``student`` on generated images only.

    The generator (:class:`Generator`, ``latent_dim`` noise -> ``image_shape`` images in
    ``[0, 1]``) minimises :func:`dafl_generator_loss` (one-hot + activation +
    information-entropy) plus ``w_bn`` times a BatchNorm-statistics prior: the mean over
    the teacher's ``BatchNorm2d`` layers of ``||batch mean - running mean|| + ||batch var
    - running var||`` of their inputs (DeepInversion, Yin et al. 2020; it pulls samples
    towards the statistics of the teacher's training data, which the student's own
    BatchNorm then sees; ``w_bn=0`` is plain DAFL, and teachers without BatchNorm get
    plain DAFL).  Adam at ``generator_lr``.  The teacher runs in eval mode with frozen
    parameters; its mode and ``requires_grad`` flags are restored at the end.

    The student (train mode, AdamW at ``lr`` with cosine decay to 0 over
    ``student_steps``) minimises ``T^2 * KL(target_T || softmax(z_s / T))`` on generated
    batches, where the target is ``teacher_probs(images)`` (probabilities at T=1, e.g.
    the specialist ensemble's ``q``, softened here as ``softmax(log q / T)``) when given,
    else ``softmax(teacher logits / T)``.  The student never sees real data, and its
    BatchNorm statistics come from generated images.  Its training flag is restored.

    ``schedule="sequential"`` (the default) trains the generator first, then the student
    on fresh samples of the final generator.  ``schedule="alternate"`` (DAFL's way)
    interleaves the steps evenly over the run (with equal counts: G, S, G, S, ...); a
    student step reuses the batch the preceding generator step made (and that step's
    teacher logits).  On 320-class glyphs at equal budget the sequential student was far
    better (16% vs 2% top-1 for G=60, S=300), since early students chase a generator
    that still makes noise.

    Budget, measured on one CPU thread (320-class 32x32 glyphs, a ``cnn_fast`` teacher at
    92% test top-1, a ``cnn`` width-0.5 student, T=4): G=200, S=600, batch 64, lr 1e-2
    reach 54-58% test top-1 (two seeds) in about 2 minutes.  The student lr matters most
    (G=60, S=300, batch 128: 16% at lr 3e-3, 32% at 6e-3, 35% at 1e-2), then the number
    of student and generator steps, and the BatchNorm prior (16% -> 10% without it).

    Args:
        teacher: frozen classifier; ``teacher(x)`` returns ``(B, num_classes)`` logits.
        student: the model being trained, same logit shape.  Both are moved to
            ``device`` in place.
        image_shape: ``(C, H, W)`` of the teacher's inputs.
        num_classes: ``K``.
        generator_steps: generator updates (>= 0; 0 distills on an untrained generator).
        student_steps: student updates (>= 1).
        batch_size: generated images per step (>= 2).
        latent_dim: noise dimension of the generator.
        temperature: KD temperature ``T > 0``.
        lr: student learning rate.
        seed: seeds the generator's initial weights and its noise (the global RNG
            state is left untouched).
        device: where the three models run.
        feature_path: dotted path of the teacher module holding the pre-FC features.
            ``None`` (default) finds it automatically: the *input* of the teacher's last
            ``nn.Linear`` (:func:`default_feature_path`; ``"head"`` for a ``Classifier``),
            in which case ``feature_capture`` is not used.
        feature_capture: ``"input"`` or ``"output"`` of ``feature_path``.
        teacher_probs: optional ``images (B, C, H, W) -> (B, K)`` probabilities used as
            distillation targets instead of the teacher's logits (called under
            ``no_grad``).  The generator is still trained against ``teacher``.
        on_progress: ``on_progress(phase, step, metrics)`` every ``progress_every``
            steps of each phase and at its last step; ``phase`` is ``"generator"``
            (metrics ``loss``, ``onehot``, ``activation``, ``entropy`` and ``bn``
            when the prior is on) or
            ``"student"`` (``kd``, ``agreement``, ``lr``); ``step`` counts from 1.
        schedule: ``"sequential"`` or ``"alternate"``, see above.
        generator_lr: generator Adam learning rate (2e-3: 0.61 vs 0.28 test top-1 for
            2e-2 on the 9-class test problem).
        generator_hidden_channels: generator width (DAFL uses 128, ~10x the compute; at
            32 a generator step costs ~1.5 student steps on glyphs).
        weight_decay: student AdamW weight decay.
        w_onehot, w_activation, w_entropy: generator loss weights (DAFL: 1, 0.1, 5).
        w_bn: weight of the BatchNorm-statistics prior (0: plain DAFL).
        histogram_samples: fresh samples of the final generator used for
            ``class_histogram``.
        progress_every: callback period in steps.

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
        ValueError: bad arguments (e.g. ``batch_size < 2``, ``temperature <= 0``, an
            unknown ``feature_path``), or models whose logits are not ``(B, K)``.
        FloatingPointError: a non-finite loss (lower ``lr`` / ``generator_lr``).
    """
    _check_arguments(
        image_shape,
        num_classes,
        generator_steps,
        student_steps,
        batch_size,
        latent_dim,
        temperature,
        lr,
        generator_lr,
        feature_capture,
        schedule,
        progress_every,
    )
    if not w_bn >= 0:
        raise ValueError(f"w_bn must be >= 0 (0 turns the BatchNorm prior off), got {w_bn!r}")
    dev = torch.device(device)
    path = default_feature_path(teacher) if feature_path is None else feature_path
    capture = "input" if feature_path is None else feature_capture
    extractor = FeatureExtractor(teacher, [path], capture=capture)  # validates the path
    c, h, w = (int(v) for v in image_shape)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)
        generator = Generator(
            latent_dim,
            (c, h, w),
            hidden_channels=generator_hidden_channels,
            num_upsamples=_num_upsamples(h, w),
        )
    generator.to(dev)
    teacher.to(dev)
    student.to(dev)
    rng = torch.Generator(device=dev).manual_seed(seed)
    gen_opt = torch.optim.Adam(generator.parameters(), lr=generator_lr)
    student_params = [p for p in student.parameters() if p.requires_grad]
    if not student_params:
        raise ValueError("student has no trainable parameters (requires_grad is False everywhere)")
    stu_opt = torch.optim.AdamW(student_params, lr=lr, weight_decay=weight_decay)
    stu_sched = torch.optim.lr_scheduler.LambdaLR(
        stu_opt, lambda step: _cosine(step, student_steps)
    )

    bn_prior = _BatchNormPrior(teacher) if w_bn > 0 else None
    if bn_prior is not None and not bn_prior.layers:
        bn_prior = None  # no BatchNorm statistics to match: plain DAFL
    generator_terms = ["loss", "onehot", "activation", "entropy"] + ["bn"] * (bn_prior is not None)
    history: dict = {
        "schedule": schedule,
        "feature_path": path,
        "feature_capture": capture,
        "bn_prior_layers": len(bn_prior.layers) if bn_prior is not None else 0,
        "generator": {k: [] for k in ["step", *generator_terms]},
        "student": {k: [] for k in ("step", "kd", "agreement", "lr")},
    }
    transfer_hist = torch.zeros(num_classes, dtype=torch.long, device=dev)
    seconds = {"generator": 0.0, "student": 0.0}

    def noise() -> Tensor:
        return torch.randn(batch_size, latent_dim, device=dev, generator=rng)

    def generator_step(step: int) -> tuple[Tensor, Tensor]:
        start = time.perf_counter()
        generator.train()
        images = generator(noise())
        logits = _check_logits("teacher", teacher(images), batch_size, num_classes)
        features = extractor.features[path]
        total, terms = dafl_generator_loss(
            logits,
            features.float(),
            w_onehot=w_onehot,
            w_activation=w_activation,
            w_entropy=w_entropy,
        )
        bn = bn_prior.pop() if bn_prior is not None else None
        if bn is not None:
            total = total + w_bn * bn
            terms["bn"] = bn.detach()
        if not torch.isfinite(total):
            raise FloatingPointError(
                f"non-finite DAFL generator loss at generator step {step}; lower generator_lr "
                f"(now {generator_lr})"
            )
        gen_opt.zero_grad(set_to_none=True)
        total.backward()
        gen_opt.step()
        metrics = {"loss": float(total.detach())} | {k: float(v) for k, v in terms.items()}
        log = history["generator"]
        log["step"].append(step)
        for key, value in metrics.items():
            log[key].append(value)
        seconds["generator"] += time.perf_counter() - start
        if on_progress is not None and (step % progress_every == 0 or step == generator_steps):
            on_progress("generator", step, metrics)
        return images.detach(), logits.detach()

    @torch.no_grad()
    def fresh_batch() -> tuple[Tensor, Tensor | None]:
        generator.train()  # the batch statistics the generator was trained with
        images = generator(noise())
        if teacher_probs is not None:
            return images, None
        return images, _check_logits("teacher", teacher(images), batch_size, num_classes)

    def student_step(step: int, images: Tensor, logits_t: Tensor | None) -> None:
        start = time.perf_counter()
        student.train()
        if teacher_probs is not None:
            with torch.no_grad():
                target = teacher_probs(images)
            loss_kwargs = {"teacher_probs": target}
        else:
            assert logits_t is not None
            target = logits_t
            loss_kwargs = {"teacher_logits": logits_t}
        logits_s = _check_logits("student", student(images), batch_size, num_classes)
        loss = soft_target_loss(logits_s, temperature=temperature, **loss_kwargs)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite distillation loss at student step {step}; lower lr (now {lr})"
            )
        stu_opt.zero_grad(set_to_none=True)
        loss.backward()
        stu_opt.step()
        current_lr = stu_opt.param_groups[0]["lr"]
        stu_sched.step()
        target_top = target.argmax(dim=1)
        transfer_hist.add_(torch.bincount(target_top, minlength=num_classes))
        metrics = {
            "kd": float(loss.detach()),
            "agreement": float((logits_s.detach().argmax(dim=1) == target_top).float().mean()),
            "lr": float(current_lr),
        }
        log = history["student"]
        log["step"].append(step)
        for key, value in metrics.items():
            log[key].append(value)
        seconds["student"] += time.perf_counter() - start
        if on_progress is not None and (step % progress_every == 0 or step == student_steps):
            on_progress("student", step, metrics)

    was_training = {"teacher": teacher.training, "student": student.training}
    params = list(teacher.parameters())
    flags = [p.requires_grad for p in params]
    teacher.eval()
    for p in params:
        p.requires_grad_(False)
    started = time.perf_counter()
    try:
        with extractor, bn_prior if bn_prior is not None else contextlib.nullcontext():
            g = s = 0
            pending: tuple[Tensor, Tensor] | None = None
            while g < generator_steps or s < student_steps:
                # next generator step at "time" (g + 1) / G, next student step at (s + 1) / S
                if schedule == "sequential":
                    take_generator = g < generator_steps
                else:
                    take_generator = g < generator_steps and (
                        s >= student_steps or (g + 1) * student_steps <= (s + 1) * generator_steps
                    )
                if take_generator:
                    g += 1
                    pending = generator_step(g)
                    continue
                s += 1
                if pending is not None:
                    images, logits_t = pending
                    pending = None
                else:
                    images, logits_t = fresh_batch()
                student_step(s, images, logits_t)
            with torch.no_grad():
                hist = torch.zeros(num_classes, dtype=torch.long, device=dev)
                generator.train()
                for _ in range(max(1, math.ceil(histogram_samples / batch_size))):
                    top = teacher(generator(noise())).argmax(dim=1)
                    hist.add_(torch.bincount(top, minlength=num_classes))
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        teacher.train(was_training["teacher"])
        student.train(was_training["student"])
    history["class_histogram"] = hist.cpu().tolist()
    history["classes_covered"] = int((hist > 0).sum())
    history["transfer_histogram"] = transfer_hist.cpu().tolist()
    history["seconds"] = seconds | {"total": time.perf_counter() - started}
    return history
