"""On-the-fly augmentation: shapes, ranges, determinism per (seed, epoch), identity when off."""

import math

import pytest
import torch

from generalist.data.augment import AugmentSpec, augment_batch, augmented_batches, default_augment


def _batch(n=8, c=1, size=16):
    x = torch.zeros(n, c, size, size)
    x[:, :, 6:10, 6:10] = 1.0  # a centred square on a black background
    return x


def test_affine_keeps_shape_range_and_moves_the_ink():
    x = _batch()
    out = augment_batch(x, AugmentSpec(kind="affine", rotate=30, scale=0.2, shift=0.2),
                        torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, x)
    # the ink is moved, not destroyed: total intensity within the scale bounds
    ratio = out.sum((1, 2, 3)) / x.sum((1, 2, 3))
    assert bool(((ratio > 0.5) & (ratio < 1.6)).all())


def test_zero_jitter_affine_is_the_identity():
    x = torch.rand(4, 3, 8, 8)
    out = augment_batch(x, AugmentSpec(kind="affine", rotate=0, scale=0, shift=0),
                        torch.Generator().manual_seed(0))
    assert torch.allclose(out, x, atol=1e-5)


def test_crop_flip_is_a_shifted_or_mirrored_copy():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6) / 72
    out = augment_batch(x, AugmentSpec(kind="crop_flip", padding=0, flip=True), torch.Generator().manual_seed(3))
    for i in range(2):
        assert torch.equal(out[i], x[i]) or torch.equal(out[i], x[i].flip(-1))
    shifted = augment_batch(x, AugmentSpec(kind="crop_flip", padding=2, flip=False),
                            torch.Generator().manual_seed(1))
    assert shifted.shape == x.shape


def test_draws_depend_only_on_seed_and_epoch():
    x = _batch()
    spec = AugmentSpec(kind="affine")

    def run(seed, epoch):
        return torch.cat([b for b, _ in augmented_batches([(x, 0), (x, 1)], spec, seed=seed, epoch=epoch)])

    assert torch.equal(run(0, 1), run(0, 1))
    assert not torch.equal(run(0, 1), run(0, 2)) and not torch.equal(run(0, 1), run(1, 1))


def test_none_passes_batches_through_untouched():
    x = torch.rand(2, 1, 4, 4)
    (out, y), = list(augmented_batches([(x, 7)], AugmentSpec(kind="none"), seed=0, epoch=0))
    assert out is x and y == 7


def test_defaults_by_channels_and_bad_specs():
    assert default_augment(1).kind == "affine" and default_augment(3).kind == "crop_flip"
    with pytest.raises(ValueError, match="unknown"):
        AugmentSpec(kind="mixup")
    with pytest.raises(ValueError, match="scale must be < 1"):
        AugmentSpec(kind="affine", scale=1.5)
    with pytest.raises(ValueError, match="float"):
        augment_batch(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), AugmentSpec(kind="affine"),
                      torch.Generator())
    assert math.isfinite(AugmentSpec().rotate)
