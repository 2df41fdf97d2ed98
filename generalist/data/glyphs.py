"""`glyphs`: the built-in, offline, several-hundred-class data set of rendered characters.

Classes are Latin letters with their diacritic families, Greek, Cyrillic and digits,
rendered from the 16 DejaVu / STIXGeneral fonts that ship with matplotlib; characters
that look the same in every font (Latin 'A', Greek 'Α', Cyrillic 'А') form one class.
Samples are jittered, re-stroked, noisy 1-channel images::

    images  # (N, 1, image_size, image_size) uint8, white ink on a dark background
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import torch

from generalist.data.core import DataBundle, DataError, Split
from generalist.data.glyph_augment import Jitter, draw_params, stroke_variants, synthesize
from generalist.data.glyph_inventory import class_name
from generalist.data.glyph_render import MERGE_TOLERANCE, base_glyphs, glyph_inventory
from generalist.data.registry import check_float, check_int, register_dataset
from generalist.data.splits import SPLIT_STREAM, generator, shuffled

BATCH = 2048  # samples rendered per vectorised batch
DEFAULT_JITTER = Jitter()


def resolve_fonts(fonts: Sequence[str], test_fonts: Sequence[str] | str | None) -> tuple[list[int], list[int]]:
    """Font indices for (train + holdout, test); test_fonts=None means all fonts for both."""
    if test_fonts is None:
        every = list(range(len(fonts)))
        return every, every
    if isinstance(test_fonts, str):
        test_fonts = [test_fonts]
    unknown = [f for f in test_fonts if f not in fonts]
    if unknown or not test_fonts:
        raise DataError(
            f"test_fonts={list(test_fonts)} must name at least one font and only known ones "
            f"(unknown: {unknown}); available fonts are {list(fonts)}."
        )
    held = sorted(fonts.index(f) for f in set(test_fonts))
    rest = [i for i in range(len(fonts)) if i not in held]
    if not rest:
        raise DataError(
            "test_fonts holds out every font, leaving none to train on; hold out at most "
            f"{len(fonts) - 1} of {list(fonts)}."
        )
    return rest, held


def _class_samples(k: int, n: int, pool: torch.Tensor, size: int, noise: float, seed: int,
                   stream: int, jitter: Jitter) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Random draws for n samples of class k: fonts (n,), params, noise (n, 1, size, size)."""
    gen = generator(seed, stream, k + 1)  # per class: a prefix of classes is seed-stable
    params = draw_params(n, noise, jitter, gen)
    fonts = pool[torch.randint(len(pool), (n,), generator=gen)]
    return fonts, params, torch.randn(n, 1, size, size, generator=gen)


def generate_split(variants: torch.Tensor, per_class: int, pool: Sequence[int], size: int,
                   noise: float, seed: int, stream: int, jitter: Jitter = DEFAULT_JITTER) -> Split:
    """`per_class` samples of each class, shuffled: (K * per_class, 1, size, size) uint8.

    variants: (K, F, 3, 2 * size, 2 * size) uint8 from `stroke_variants`; pool: font ids.
    """
    num_classes, pool_t = variants.shape[0], torch.tensor(list(pool), dtype=torch.int64)
    chunk = max(1, BATCH // max(per_class, 1))
    images = [torch.zeros(0, 1, size, size, dtype=torch.uint8)]
    for start in range(0, num_classes if per_class else 0, chunk):
        classes = torch.arange(start, min(start + chunk, num_classes))
        draws = [_class_samples(int(k), per_class, pool_t, size, noise, seed, stream, jitter)
                 for k in classes]
        fonts = torch.cat([d[0] for d in draws])
        params = {key: torch.cat([d[1][key] for d in draws]) for key in draws[0][1]}
        noise_field = torch.cat([d[2] for d in draws])
        batch_labels = classes.repeat_interleave(per_class)
        images.append(synthesize(variants, batch_labels, fonts, params, noise_field, size))
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    return shuffled(Split(torch.cat(images), labels), seed, stream, 0)


@register_dataset("glyphs")
def build_glyphs(*, root: str | None = None, seed: int = 0, num_classes: int | None = None,
                 train_per_class: int = 100, holdout_per_class: int = 20,
                 test_per_class: int = 20, image_size: int = 32,
                 test_fonts: Sequence[str] | None = None, noise: float = 0.08) -> DataBundle:
    """Rendered characters, 1 x image_size x image_size; `root` is ignored (nothing to read).

    num_classes takes the first N classes (whole diacritic families stay together);
    test_fonts (font file stems) are used only by the test split; noise is the largest
    per-sample Gaussian noise std in [0, 1] intensity units.
    """
    inventory = glyph_inventory()
    count = _check_num_classes(num_classes, len(inventory.classes))
    per_split = {
        "train": check_int("train_per_class", train_per_class, minimum=1),
        "holdout": check_int("holdout_per_class", holdout_per_class, minimum=0),
        "test": check_int("test_per_class", test_per_class, minimum=0),
    }
    size = check_int("image_size", image_size, minimum=8, maximum=256)
    noise = check_float("noise", noise, minimum=0.0, maximum=1.0)
    fit_pool, test_pool = resolve_fonts(inventory.fonts, test_fonts)
    variants = stroke_variants(base_glyphs(2 * size)[:count])
    pools = {"train": fit_pool, "holdout": fit_pool, "test": test_pool}
    splits = {
        name: generate_split(variants, n, pools[name], size, noise, seed, SPLIT_STREAM[name])
        for name, n in per_split.items()
    }
    classes = inventory.classes[:count]
    info = _info(inventory, classes, fit_pool, test_pool, size, noise, per_split)
    names = tuple(class_name(m) for m in classes)
    return DataBundle("glyphs", names, splits["train"], splits["holdout"], splits["test"], info)


def _check_num_classes(num_classes: int | None, available: int) -> int:
    if num_classes is None:
        return available
    count = check_int("num_classes", num_classes, minimum=2)
    if count > available:
        raise DataError(
            f"glyphs has {available} classes but num_classes={count} was requested; pass "
            f"num_classes <= {available} (or None for all)."
        )
    return count


def _info(inventory, classes, fit_pool, test_pool, size, noise, per_split) -> dict:
    family = list(inventory.family_of[:len(classes)])
    return {
        "fonts": list(inventory.fonts),
        "train_fonts": [inventory.fonts[i] for i in fit_pool],
        "test_fonts": [inventory.fonts[i] for i in test_pool],
        "merged": [list(m) for m in classes if len(m) > 1],
        "family_of": family,
        "num_families": len(set(family)),
        "merge_tolerance": MERGE_TOLERANCE,
        "image_size": size,
        "noise": noise,
        "per_class": per_split,
        "matplotlib_version": matplotlib.__version__,
        # Every sample is already drawn with its own affine jitter, stroke and noise: more jitter
        # on top measured worse (full glyphs, converged generalist: 0.953 with it, 0.958 without).
        "augment": "none",
    }
