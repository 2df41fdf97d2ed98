"""DAFL, data-free learning of student networks (Chen et al. 2019): the generator and its losses.

A generator maps noise ``z`` to images that make the frozen teacher (i) confident (one-hot
loss), (ii) strongly activated (activation loss on the features before the last FC), and
(iii) balanced across classes (information-entropy loss); optionally (iv) match the teacher's
BatchNorm statistics (DeepInversion's prior, Yin et al. 2020, :class:`BatchNormPrior`).
:func:`train_generator_step` is the one generator update; the complete loop that also
distills the student on generated images is :mod:`distill.data_free_train`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.features import CAPTURE_MODES, FeatureExtractor

__all__ = [
    "BatchNormPrior",
    "Generator",
    "GeneratorStep",
    "activation_loss",
    "dafl_generator_loss",
    "default_feature_path",
    "frozen",
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


class BatchNormPrior:
    """Forward hooks on a model's ``BatchNorm2d`` layers (with running statistics) that
    record, for every call made with grad enabled, ``||mean_b(x) - running_mean||_2 +
    ||var_b(x) - running_var||_2`` of the layer input ``x`` (DeepInversion's
    feature-statistics prior, Yin et al. 2020).  Calls under ``no_grad`` are not recorded.
    Hooks are registered on ``__enter__`` and removed on ``__exit__``; it can be entered again.
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

    def __enter__(self) -> BatchNormPrior:
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


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode with ``requires_grad`` off on its parameters (gradients still flow
    through it to its inputs); its training flag and ``requires_grad`` flags are restored on exit."""
    was_training = model.training
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    model.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)


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
    if not isinstance(logits, Tensor):
        raise ValueError(f"the teacher must return a (B, K) logits tensor, got {type(logits).__name__}; "
                         "with feature_path set, features come from the hooked module")
    return logits, extractor.features[feature_path]


@dataclass(frozen=True)
class GeneratorStep:
    """One generator update: the batch it made and what the teacher said about it (detached)."""

    images: Tensor  # (B, C, H, W) generated images in [0, 1]
    logits: Tensor  # (B, K) float teacher logits on ``images``
    loss: Tensor  # () total generator loss
    terms: dict[str, Tensor]  # unweighted "onehot", "activation", "entropy" (and "bn" with the prior)


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
    bn_prior: BatchNormPrior | None = None,
    w_bn: float = 1.0,
    rng: torch.Generator | None = None,
) -> GeneratorStep:
    """One DAFL generator update against a frozen teacher.

    The teacher runs :func:`frozen` (eval mode, no parameter gradients; gradients flow through
    it to the images only); its mode and flags are restored afterwards.  The generator runs in
    train mode.

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
        bn_prior: optional :class:`BatchNormPrior` on the teacher, added with weight ``w_bn``
            (teachers without BatchNorm layers add nothing).
        rng: optional ``torch.Generator`` (on the generator's device) for ``z``.

    Raises:
        FloatingPointError: a non-finite loss (nothing is updated; lower the learning rate).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2 (BatchNorm), got {batch_size!r}")
    if feature_capture not in CAPTURE_MODES:
        raise ValueError(f"feature_capture must be one of {CAPTURE_MODES}, got {feature_capture!r}")
    _check_optimizer(optimizer, teacher)
    with frozen(teacher), bn_prior if bn_prior is not None else contextlib.nullcontext():
        generator.train()
        images = generator.sample(batch_size, generator=rng)  # (B, C, H, W)
        logits, features = _teacher_outputs(teacher, images, feature_path, feature_capture)
        logits = logits.float()  # (B, K)
        total, terms = dafl_generator_loss(
            logits, features.float(), w_onehot=w_onehot, w_activation=w_activation, w_entropy=w_entropy
        )
        bn = bn_prior.pop() if bn_prior is not None else None
        if bn is not None:
            total = total + w_bn * bn
            terms["bn"] = bn.detach()
        if not torch.isfinite(total):
            raise FloatingPointError(
                "non-finite DAFL generator loss; lower the generator's learning rate (now "
                f"{optimizer.param_groups[0]['lr']})"
            )
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
    return GeneratorStep(images.detach(), logits.detach(), total.detach(), terms)
