"""Data-free distillation: the DAFL generator and its losses (Chen et al. 2019).

A generator maps noise ``z`` to images that make the frozen teacher (i) confident
(one-hot loss), (ii) strongly activated (activation loss on the features before the
last FC), and (iii) balanced across classes (information-entropy loss).  The student
is then distilled on generated images with :func:`distill.losses.kd_loss`; that loop
belongs to the orchestration code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.features import CAPTURE_MODES, FeatureExtractor

__all__ = [
    "Generator",
    "activation_loss",
    "dafl_generator_loss",
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
