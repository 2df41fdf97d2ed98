"""Feature-map losses: FSP matrices, neuron selectivity transfer, factor transfer, activation
boundaries. Each compares conv feature maps ``(B, C, H, W)`` the objective captures with forward
hooks at the layers a term names (``distill.layers``); the teacher side is always detached.

* FSP (Yim et al. 2017): the "flow of solution procedure" Gram matrix between two layers of
  one model, ``G[i, j] = mean_hw F1[i, h, w] F2[j, h, w]`` ``(B, C1, C2)``; the student's matrix
  should match the teacher's, so both models' layers must have the same channel counts.
* NST (Huang & Wang 2017): squared MMD with the polynomial kernel ``k(a, b) = (a . b)^2``
  between the channels' L2-normalised spatial maps, channels treated as samples.
* factor transfer (Kim et al. 2018): a paraphraser autoencoder learns the teacher's map first
  (:func:`train_paraphraser`); then a translator maps the student's map to a factor of the
  same size and the loss is the L1 distance between the L2-normalised factors.
* activation boundaries (Heo et al. 2019): a connector (1x1 conv + BN) maps the student's map
  to the teacher's channels; a squared hinge with a margin pushes each connector response to
  the side of zero the teacher's neuron is on (active or not).

When the two maps of one comparison differ in ``(H, W)``, FSP, NST and factor transfer
adaptive-average-pool the larger to the smaller; activation boundaries need equal sizes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.registry import LOSSES

__all__ = [
    "ActivationBoundaryLoss",
    "FSPLoss",
    "FactorTransferLoss",
    "NSTLoss",
    "Paraphraser",
    "activation_boundary_loss",
    "factor_transfer_loss",
    "fsp_loss",
    "fsp_matrix",
    "nst_loss",
    "train_paraphraser",
]


def _check_maps(what: str, *maps: Tensor) -> None:
    shapes = [tuple(m.shape) for m in maps]
    if any(m.dim() != 4 for m in maps) or len({m.shape[0] for m in maps}) != 1:
        raise ValueError(f"{what}: feature maps must be (B, C, H, W) with one batch size, got {shapes}")


def _same_size(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Adaptive-average-pool the larger of two ``(B, C, H, W)`` maps to the smaller ``(H, W)``."""
    size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
    a = a if tuple(a.shape[2:]) == size else F.adaptive_avg_pool2d(a, size)
    b = b if tuple(b.shape[2:]) == size else F.adaptive_avg_pool2d(b, size)
    return a, b


# ---------------------------------------------------------------------------------- FSP


def fsp_matrix(first: Tensor, second: Tensor) -> Tensor:
    """``(B, C1, H1, W1), (B, C2, H2, W2) -> (B, C1, C2)``: ``mean_hw first[i] * second[j]``
    after pooling the larger map to the smaller size."""
    _check_maps("fsp", first, second)
    first, second = _same_size(first, second)
    return first.flatten(2) @ second.flatten(2).transpose(1, 2) / (first.shape[2] * first.shape[3])


def fsp_loss(student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor]) -> Tensor:
    """Sum over consecutive layer pairs ``(l, l + 1)`` of ``mean((G_s - G_t)^2)``.

    Args:
        student_maps: ``n >= 2`` student maps ``(B, C_l, H_l, W_l)`` in network order.
        teacher_maps: ``n`` teacher maps; the teacher's ``C_l`` must equal the student's.

    Returns:
        Scalar. Gradient scale: a mean over ``B * C_l * C_{l+1}`` entries per pair (independent
        of B and the channel counts), summed over the ``n - 1`` pairs; the entries are products
        of activations, so the loss grows with the square of the activation scale (the authors'
        code weights it by 50).
    """
    if len(student_maps) != len(teacher_maps) or len(student_maps) < 2:
        raise ValueError(f"fsp: needs the same number (>= 2) of student and teacher maps, got "
                         f"{len(student_maps)} and {len(teacher_maps)}")
    total = student_maps[0].new_zeros(())
    for i in range(len(student_maps) - 1):
        g_s = fsp_matrix(student_maps[i], student_maps[i + 1])
        g_t = fsp_matrix(teacher_maps[i].detach(), teacher_maps[i + 1].detach())
        if g_s.shape[1:] != g_t.shape[1:]:
            raise ValueError(
                f"fsp: the student's maps {tuple(student_maps[i].shape)} -> "
                f"{tuple(student_maps[i + 1].shape)} give {tuple(g_s.shape[1:])} matrices but the "
                f"teacher's {tuple(teacher_maps[i].shape)} -> {tuple(teacher_maps[i + 1].shape)} "
                f"give {tuple(g_t.shape[1:])}; pair layers with equal channel counts")
        total = total + (g_s - g_t).pow(2).mean()
    return total


@LOSSES.register("fsp")
class FSPLoss(nn.Module):
    """Module form of :func:`fsp_loss`; a multi-layer term: name two or more
    ``[student, teacher]`` layer pairs in network order (no parameters)."""

    multi_layer: ClassVar[bool] = True

    def forward(self, student_maps: Sequence[Tensor], teacher_maps: Sequence[Tensor]) -> Tensor:
        """n student maps, n teacher maps -> scalar."""
        return fsp_loss(student_maps, teacher_maps)


# ---------------------------------------------------------------------------------- NST


def _poly_kernel(a: Tensor, b: Tensor) -> Tensor:
    """``(B, Ca, N), (B, Cb, N) -> (B, Ca, Cb)``: ``(a_i . b_j)^2``."""
    return (a @ b.transpose(1, 2)).pow(2)


def nst_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """Squared MMD between the channels' normalised maps with the kernel ``(a . b)^2``:
    ``mean k(t, t) + mean k(s, s) - 2 mean k(s, t)``.

    Args:
        student_features: ``(B, C_s, H_s, W_s)``.
        teacher_features: ``(B, C_t, H_t, W_t)``; channel counts may differ.

    Returns:
        Scalar in ``[0, 2]``. Gradient scale: kernel means over ``B * C * C'`` entries, so
        independent of B and of the channel counts (the authors' code weights it by 50).
    """
    _check_maps("nst", student_features, teacher_features)
    s, t = _same_size(student_features, teacher_features.detach())
    s = F.normalize(s.flatten(2), dim=2)  # (B, C_s, H * W)
    t = F.normalize(t.flatten(2), dim=2)
    return _poly_kernel(t, t).mean() + _poly_kernel(s, s).mean() - 2.0 * _poly_kernel(s, t).mean()


@LOSSES.register("nst")
class NSTLoss(nn.Module):
    """Module form of :func:`nst_loss` for one layer pair (no parameters)."""

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        """``(B, C_s, H, W)``, ``(B, C_t, H', W')`` -> scalar."""
        return nst_loss(student_features, teacher_features)


# ------------------------------------------------------------------------ factor transfer


def _conv_stack(channels: Sequence[int], transposed: bool = False) -> nn.Sequential:
    """3x3 (transposed) convs ``channels[i] -> channels[i + 1]``, each with BN and LeakyReLU(0.1);
    the spatial size is kept."""
    conv = nn.ConvTranspose2d if transposed else nn.Conv2d
    layers: list[nn.Module] = []
    for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
        layers += [conv(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class Paraphraser(nn.Module):
    """Autoencoder of the teacher's map: encoder ``C -> C -> kC -> kC``, decoder back to ``C``
    (3x3 convs, BN, LeakyReLU(0.1), as in the authors' design); the factor is the encoding."""

    def __init__(self, channels: int, factor_channels: int) -> None:
        super().__init__()
        self.encoder = _conv_stack([channels, channels, factor_channels, factor_channels])
        self.decoder = _conv_stack([factor_channels, factor_channels, channels, channels], transposed=True)

    def forward(self, features: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)`` reconstruction."""
        return self.decoder(self.encoder(features))


def factor_transfer_loss(student_factor: Tensor, teacher_factor: Tensor, p: int = 1) -> Tensor:
    """``|| f_s / ||f_s|| - f_t / ||f_t|| ||`` on the flattened factors: the mean absolute
    difference over all ``B * D`` entries for ``p = 1`` (torchdistill's reduction), else the
    batch mean of the per-example ``p``-norm.

    Args:
        student_factor: ``(B, ...)`` the translator's output.
        teacher_factor: ``(B, ...)`` the paraphraser's encoding, same number of entries per example.

    Returns:
        Scalar. Gradient scale: for ``p = 1`` a mean over ``D`` of unit-norm vectors' entries,
        so it shrinks like ``1 / sqrt(D)`` as the factor grows (the paper weights it by 500-1000).
    """
    s = F.normalize(student_factor.flatten(1), dim=1)
    t = F.normalize(teacher_factor.detach().flatten(1), dim=1)
    if s.shape != t.shape:
        raise ValueError(f"factor transfer: student factor {tuple(student_factor.shape)} and teacher "
                         f"factor {tuple(teacher_factor.shape)} have different sizes")
    if p == 1:
        return (s - t).abs().mean()
    return torch.linalg.vector_norm(s - t, ord=p, dim=1).mean()


@LOSSES.register("ft")
class FactorTransferLoss(nn.Module):
    """Factor transfer for one layer pair: paraphraser (trained first, then frozen in eval mode)
    on the teacher's map, translator (trained with the student) on the student's map.

    Args:
        student_channels / teacher_channels: ``C_s`` and ``C_t`` of the two maps.
        rate: the paraphrase rate ``k``: the factor has ``round(k * C_t)`` channels (paper: 0.5).
        p: norm of the distance (1 in the paper).
        paraphraser_epochs: passes over the training set that train the paraphraser before the
            student trains (reconstruction MSE, Adam).
        paraphraser_lr: the paraphraser's learning rate.
    """

    needs_fit: ClassVar[bool] = True

    def __init__(self, student_channels: int, teacher_channels: int, *, rate: float = 0.5, p: int = 1,
                 paraphraser_epochs: int = 2, paraphraser_lr: float = 1e-3) -> None:
        super().__init__()
        if not 0 < rate <= 4 or paraphraser_epochs < 1 or p < 1:
            raise ValueError(f"ft: rate must lie in (0, 4], p >= 1 and paraphraser_epochs >= 1, "
                             f"got rate={rate!r}, p={p!r}, paraphraser_epochs={paraphraser_epochs!r}")
        factor = max(1, round(rate * teacher_channels))
        self.p, self.paraphraser_epochs, self.paraphraser_lr = int(p), int(paraphraser_epochs), float(paraphraser_lr)
        self.paraphraser = Paraphraser(teacher_channels, factor)
        self.translator = _conv_stack([student_channels, student_channels, factor, factor])
        self.paraphraser.requires_grad_(False)
        self.paraphraser.eval()

    @classmethod
    def sized(cls, layers: Sequence[tuple[str, str]], student: Sequence[torch.Size],
              teacher: Sequence[torch.Size], num_examples: int | None) -> dict[str, int]:
        """Constructor arguments from the probed ``(B, C, H, W)`` shapes of the layer pair."""
        return {"student_channels": int(student[0][1]), "teacher_channels": int(teacher[0][1])}

    def fit(self, epoch_maps: Callable[[int], Iterable[Tensor]]) -> list[float]:
        """Train the paraphraser first (:func:`train_paraphraser`); per-epoch reconstruction MSE."""
        return train_paraphraser(self, epoch_maps)

    def train(self, mode: bool = True) -> FactorTransferLoss:
        """Set the translator's mode; the paraphraser stays frozen in eval mode."""
        super().train(mode)
        self.paraphraser.eval()
        return self

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        """``(B, C_s, H, W)``, ``(B, C_t, H', W')`` -> scalar."""
        _check_maps("factor transfer", student_features, teacher_features)
        with torch.no_grad():
            factor_t = self.paraphraser.encoder(teacher_features.detach())
        factor_s, factor_t = _same_size(self.translator(student_features), factor_t)
        return factor_transfer_loss(factor_s, factor_t, self.p)


def train_paraphraser(loss: FactorTransferLoss, epoch_maps: Callable[[int], Iterable[Tensor]]) -> list[float]:
    """Train ``loss.paraphraser`` to reconstruct teacher maps (MSE, Adam) for
    ``loss.paraphraser_epochs`` passes; ``epoch_maps(epoch)`` yields ``(B, C_t, H, W)`` maps.
    Leaves it frozen in eval mode; returns the mean reconstruction loss of each pass."""
    paraphraser = loss.paraphraser
    paraphraser.requires_grad_(True).train()
    optimizer = torch.optim.Adam(paraphraser.parameters(), lr=loss.paraphraser_lr)
    history = []
    for epoch in range(loss.paraphraser_epochs):
        total, count = 0.0, 0
        for maps in epoch_maps(epoch):
            maps = maps.detach().float()
            reconstruction = F.mse_loss(paraphraser(maps), maps)
            optimizer.zero_grad(set_to_none=True)
            reconstruction.backward()
            optimizer.step()
            total, count = total + float(reconstruction.detach()) * maps.shape[0], count + maps.shape[0]
        history.append(total / max(count, 1))
    optimizer.zero_grad(set_to_none=True)   # no stale gradient for the student's optimizer to apply
    paraphraser.requires_grad_(False).eval()
    return history


# ---------------------------------------------------------------------- activation boundaries


def activation_boundary_loss(responses: Tensor, teacher_features: Tensor, margin: float = 1.0) -> Tensor:
    """Squared-hinge transfer of activation boundaries, summed over units, averaged over the batch:
    ``(r + m)^2`` where the teacher's unit is off (``t <= 0``) but ``r > -m``, and ``(r - m)^2``
    where it is on (``t > 0``) but ``r <= m``.

    The teacher's units are read as on/off by their sign; a ReLU keeps the sign, so a map taken
    after the teacher's ReLU gives the same on/off pattern as its pre-activation.

    Args:
        responses: ``(B, C, H, W)`` the connector's output on the student's map.
        teacher_features: ``(B, C, H, W)`` the teacher's map (same shape).
        margin: ``m > 0``.

    Returns:
        Scalar. Gradient scale: a sum over ``C * H * W`` units per example, so it grows linearly
        with the map size (the authors' code scales it by 3/1000 and applies it as a warm start).
    """
    if responses.shape != teacher_features.shape:
        raise ValueError(f"ab: connector output {tuple(responses.shape)} and teacher map "
                         f"{tuple(teacher_features.shape)} must have the same shape")
    on = teacher_features.detach() > 0
    loss = torch.where(on & (responses <= margin), (responses - margin).pow(2), torch.zeros_like(responses))
    loss = loss + torch.where(~on & (responses > -margin), (responses + margin).pow(2), torch.zeros_like(responses))
    return loss.sum() / responses.shape[0]


@LOSSES.register("ab")
class ActivationBoundaryLoss(nn.Module):
    """Activation-boundary transfer for one layer pair through a connector ``1x1 conv (C_s -> C_t)
    + BN``; the two maps must have the same ``(H, W)``.

    Args:
        student_channels / teacher_channels: ``C_s`` and ``C_t``.
        margin: the hinge margin ``m`` (paper: 1).
    """

    def __init__(self, student_channels: int, teacher_channels: int, *, margin: float = 1.0) -> None:
        super().__init__()
        if not margin > 0:
            raise ValueError(f"ab: margin must be > 0, got {margin!r}")
        self.margin = float(margin)
        self.connector = nn.Sequential(nn.Conv2d(student_channels, teacher_channels, 1, bias=False),
                                       nn.BatchNorm2d(teacher_channels))

    @classmethod
    def sized(cls, layers: Sequence[tuple[str, str]], student: Sequence[torch.Size],
              teacher: Sequence[torch.Size], num_examples: int | None) -> dict[str, int]:
        """Constructor arguments from the probed ``(B, C, H, W)`` shapes of the layer pair."""
        return {"student_channels": int(student[0][1]), "teacher_channels": int(teacher[0][1])}

    def forward(self, student_features: Tensor, teacher_features: Tensor) -> Tensor:
        """``(B, C_s, H, W)``, ``(B, C_t, H, W)`` -> scalar."""
        _check_maps("ab", student_features, teacher_features)
        if student_features.shape[2:] != teacher_features.shape[2:]:
            raise ValueError(
                f"ab: cannot match student map {tuple(student_features.shape)} to teacher map "
                f"{tuple(teacher_features.shape)}: the 1x1 connector needs equal spatial sizes; "
                "pair layers with the same (H, W)")
        return activation_boundary_loss(self.connector(student_features), teacher_features, self.margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"
