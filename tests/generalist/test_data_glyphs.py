"""The built-in `glyphs` data set: inventory, merges, families, determinism, options."""

import hashlib

import pytest
import torch

from generalist.data import DataError, create_dataset
from generalist.data.glyph_augment import stroke_variants
from generalist.data.glyph_inventory import base_letter
from generalist.data.glyph_render import (
    FONT_STEMS,
    MERGE_TOLERANCE,
    _compare_table,
    base_glyphs,
    envelope_distance,
)
from generalist.data.glyphs import generate_split


@pytest.fixture(scope="module")
def full():
    """Every class, 2 + 1 + 1 samples each."""
    return create_dataset("glyphs", seed=0, train_per_class=2, holdout_per_class=1,
                          test_per_class=1)


def _small(**options):
    settings = {"num_classes": 20, "train_per_class": 3, "holdout_per_class": 1,
                "test_per_class": 1, **options}
    return create_dataset("glyphs", **settings)


def test_default_inventory_has_several_hundred_classes(full):
    assert 350 <= full.num_classes <= 500
    assert len(set(full.class_names)) == full.num_classes
    assert full.image_shape == (1, 32, 32)
    assert full.train.images.dtype == torch.uint8 and full.train.images.is_contiguous()
    assert torch.bincount(full.train.labels).tolist() == [2] * full.num_classes
    assert torch.bincount(full.test.labels).tolist() == [1] * full.num_classes
    assert full.info["fonts"] == list(FONT_STEMS) and len(FONT_STEMS) == 16


def test_homoglyphs_are_merged_and_diacritics_are_not(full):
    names = full.class_names
    assert "A/Α/А" in names and "O/Ο/О" in names and "H/Η/Н" in names
    assert ["A", "Α", "А"] in full.info["merged"]
    singles = {c for n in names for c in n.split("/")}
    for char in "aáàâäãåāăą":  # Latin a (merged with Cyrillic а) and its accented forms
        assert char in singles
    assert "a/а" in names and "á" in names and "à" in names
    assert len({n for n in names if n.split("/")[0] in "aáàâ"}) == 4
    for merged in full.info["merged"]:
        assert "/".join(merged) in names


def test_merge_criterion_separates_same_drawing_from_different_accent():
    chars, _, table = _compare_table()
    picked = ["A", "Α", "А", "Ĕ", "Ě", "a", "á"]
    sub = table[:, [chars.index(c) for c in picked]]  # (F, 7, R, R) uint8
    high = torch.nn.functional.max_pool2d(sub.float(), 3, 1, 1).to(torch.uint8)
    low = 255 - torch.nn.functional.max_pool2d(255 - sub.float(), 3, 1, 1).to(torch.uint8)

    def distance(a, b):
        return envelope_distance(sub, low, high, picked.index(a), picked.index(b))

    assert distance("A", "Α") < 0.1  # identical outlines in all 16 fonts
    assert distance("A", "А") < MERGE_TOLERANCE
    assert distance("Ĕ", "Ě") > MERGE_TOLERANCE + 0.15  # breve vs caron
    assert distance("a", "á") > 0.9


def test_classes_are_ordered_family_by_family(full):
    names, family = full.class_names, full.info["family_of"]
    assert names[0] == "A/Α/А" and names[1] == "À"
    assert family == sorted(family)  # each family is one contiguous run
    by_name = dict(zip(names, family, strict=True))
    assert {by_name[n] for n in ("a/а", "á", "à", "â", "ä", "ã", "å", "ā", "ă", "ą")} == {by_name["a/а"]}
    assert by_name["c/с"] == by_name["č"] == by_name["ç"]
    assert by_name["A/Α/А"] != by_name["a/а"]
    assert full.info["num_families"] == len(set(family)) and 150 <= len(set(family)) <= 250
    assert base_letter("ø") == "o" and base_letter("Ё") == "Е" and base_letter("ı") == "i"


def test_num_classes_takes_a_prefix_and_rejects_too_many(full):
    small = _small(num_classes=12)
    assert small.class_names == full.class_names[:12]
    assert small.info["family_of"] == full.info["family_of"][:12]
    with pytest.raises(DataError, match=f"glyphs has {full.num_classes} classes but num_classes=9999"):
        create_dataset("glyphs", num_classes=9999)


def test_same_seed_same_bytes_other_seed_other_samples():
    first, again, other = _small(seed=4), _small(seed=4), _small(seed=5)
    assert first.describe() == again.describe()
    assert torch.equal(first.train.images, again.train.images)
    assert first.describe()["splits"]["train"]["sha256"] != other.describe()["splits"]["train"]["sha256"]
    assert first.describe()["class_names_sha256"] == other.describe()["class_names_sha256"]


def test_class_samples_do_not_depend_on_how_many_classes_are_built():
    def class_images(bundle, k):
        picked = bundle.train.images[bundle.train.labels == k]
        return sorted(hashlib.sha256(img.numpy().tobytes()).hexdigest() for img in picked)

    few, more = _small(num_classes=5), _small(num_classes=20)
    assert class_images(few, 3) == class_images(more, 3)


def test_held_out_fonts_feed_only_the_test_split():
    bundle = _small(test_fonts=["STIXGeneralItalic", "DejaVuSansMono"])
    assert bundle.info["test_fonts"] == ["DejaVuSansMono", "STIXGeneralItalic"]
    assert len(bundle.info["train_fonts"]) == 14
    assert "DejaVuSansMono" not in bundle.info["train_fonts"]
    # with one test font the test images are that font's: bold ones carry more ink
    regular = _small(test_fonts=["DejaVuSans"], test_per_class=6, noise=0.0)
    bold = _small(test_fonts=["DejaVuSans-Bold"], test_per_class=6, noise=0.0)
    assert torch.equal(regular.test.labels, bold.test.labels)
    ink_regular = regular.test.images.float().mean(dim=(1, 2, 3))
    ink_bold = bold.test.images.float().mean(dim=(1, 2, 3))
    assert (ink_bold > ink_regular).float().mean() > 0.9


def test_generate_split_draws_fonts_from_the_pool_only():
    variants = stroke_variants(base_glyphs(64)[:3])
    one = generate_split(variants, 4, [0], 32, 0.0, seed=1, stream=2)
    same = generate_split(variants, 4, [0], 32, 0.0, seed=1, stream=2)
    other_font = generate_split(variants, 4, [12], 32, 0.0, seed=1, stream=2)
    assert torch.equal(one.images, same.images)
    assert torch.equal(one.labels, other_font.labels)
    assert not torch.equal(one.images, other_font.images)


def test_bad_fonts_and_options_are_rejected_with_the_fix():
    with pytest.raises(DataError, match="available fonts are .*DejaVuSans"):
        _small(test_fonts=["ComicSans"])
    with pytest.raises(DataError, match="holds out every font"):
        _small(test_fonts=list(FONT_STEMS))
    with pytest.raises(DataError, match=r"valid options are \[.*'test_fonts'.*\]"):
        create_dataset("glyphs", fonts=["DejaVuSans"])
    with pytest.raises(DataError, match="train_per_class"):
        _small(train_per_class=0)


def test_image_size_and_noise_options():
    bundle = _small(num_classes=4, image_size=16, noise=0.0)
    assert bundle.image_shape == (1, 16, 16)
    assert bundle.train.images.shape == (12, 1, 16, 16)
    clean = _small(num_classes=4, noise=0.0)
    noisy = _small(num_classes=4, noise=0.3)
    # noise-free background pixels are one flat value per image; noise spreads them
    def background_spread(images):
        corners = images[:, 0, :3, :3].float().flatten(1)
        return corners.std(dim=1).mean().item()
    assert background_spread(clean.train.images) < 0.5
    assert background_spread(noisy.train.images) > 5.0
