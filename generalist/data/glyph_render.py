"""Render characters with the fonts that ship with matplotlib, and find identical glyphs.

Each (character, font) is rendered once with FreeType (`matplotlib.ft2font.FT2Font`, no
hinting, anti-aliased) at twice the canvas resolution, centred by its ink bounding box
and box-averaged down. The point size is fixed per font so that the largest character
of the whole inventory fills FILL of the canvas: glyphs keep their relative size ('o' is
smaller than 'O'). Results are cached in-process.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.ft2font import FT2Font, LoadFlags

from generalist.data.core import DataError
from generalist.data.glyph_augment import dilate3
from generalist.data.glyph_inventory import candidate_characters, order_classes

FONT_STEMS = (
    "DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique",
    "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic",
    "DejaVuSansMono", "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique",
    "DejaVuSansMono-BoldOblique",
    "STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic", "STIXGeneralBolIta",
)
REFERENCE_PT = 32.0  # size at which ink extents are measured
FILL = 0.78  # largest ink extent of a font / canvas side
SUPERSAMPLE = 2  # render at SUPERSAMPLE x the canvas, then box-average down
COMPARE_SIZE = 64  # canvas on which glyphs are compared for merging
# Two characters are one class when, in every font, each render (COMPARE_SIZE px, 0..1
# intensity) stays within MERGE_TOLERANCE of the other's +-1 px envelope (between its
# 3 x 3 erosion and dilation): the same drawing up to sub-pixel placement. With the
# matplotlib 3.x fonts the homoglyphs (A/Α/А, o/ο/о, ...) score <= 0.45 and the closest
# genuinely different pair (breve vs caron, 'Ĕ' vs 'Ě') scores 0.83.
MERGE_TOLERANCE = 0.6
PREFILTER = 0.9  # only pairs this close at 32 x 32 (L-inf) are compared in detail
_FLAGS = LoadFlags.NO_HINTING


@dataclass(frozen=True)
class GlyphInventory:
    """The glyph classes: members per class (class order), family per class, fonts."""

    fonts: tuple[str, ...]
    classes: tuple[tuple[str, ...], ...]
    family_of: tuple[int, ...]
    extents: tuple[float, ...]  # per font: largest ink extent (px) at REFERENCE_PT


def font_path(stem: str) -> Path:
    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / f"{stem}.ttf"
    if not path.is_file():
        raise DataError(
            f"font file {path} is missing, so the glyphs data set cannot be rendered; "
            "reinstall matplotlib (pip install --force-reinstall matplotlib), which ships it."
        )
    return path


@functools.cache
def load_font(stem: str) -> FT2Font:
    return FT2Font(str(font_path(stem)))


def render_ink(font: FT2Font, char: str, size_pt: float) -> np.ndarray:
    """Anti-aliased ink of `char` cropped to its bounding box: (h, w) uint8 (h = 0 if blank)."""
    font.set_size(size_pt, 72)
    font.set_text(char, 0.0, flags=_FLAGS)
    font.draw_glyphs_to_bitmap(antialiased=True)
    image = np.asarray(font.get_image())
    rows, cols = np.flatnonzero(image.any(1)), np.flatnonzero(image.any(0))
    if rows.size == 0:
        return np.zeros((0, 0), dtype=np.uint8)
    return image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def ink_extents(stem: str, chars: list[str]) -> np.ndarray:
    """Per character max(height, width) of its outline box in px at REFERENCE_PT: (len,)."""
    font = load_font(stem)
    font.set_size(REFERENCE_PT, 72)
    boxes = np.array([font.load_char(ord(c), flags=_FLAGS).bbox for c in chars], dtype=np.float64)
    return np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) / 64.0  # 26.6 fixed


def render_canvas(stem: str, chars: list[str], extent: float, size: int) -> torch.Tensor:
    """`chars` in font `stem`, ink-box centred on a size x size canvas: (len, size, size) uint8."""
    font, hi = load_font(stem), size * SUPERSAMPLE
    size_pt = REFERENCE_PT * FILL * hi / extent
    canvas = np.zeros((len(chars), hi, hi), dtype=np.uint8)
    for index, char in enumerate(chars):
        ink = render_ink(font, char, size_pt)[:hi, :hi]
        top, left = (hi - ink.shape[0]) // 2, (hi - ink.shape[1]) // 2
        canvas[index, top:top + ink.shape[0], left:left + ink.shape[1]] = ink
    pooled = F.avg_pool2d(torch.from_numpy(canvas).unsqueeze(1).to(torch.float32), SUPERSAMPLE)
    return pooled.squeeze(1).round_().to(torch.uint8)


def covered(chars: list[str], stems: tuple[str, ...]) -> list[str]:
    """The characters that have a glyph in every font."""
    fonts = [load_font(s) for s in stems]
    return [c for c in chars if all(f.get_char_index(ord(c)) != 0 for f in fonts)]


@functools.lru_cache(maxsize=1)
def _compare_table() -> tuple[tuple[str, ...], tuple[float, ...], torch.Tensor]:
    """(characters, per-font extent, renders (F, N, COMPARE_SIZE, COMPARE_SIZE) uint8)."""
    chars = covered(candidate_characters(), FONT_STEMS)
    extents = tuple(float(ink_extents(s, chars).max()) for s in FONT_STEMS)
    table = torch.stack([
        render_canvas(s, chars, e, COMPARE_SIZE) for s, e in zip(FONT_STEMS, extents, strict=True)
    ])
    inked = (table.flatten(2).amax(2) > 0).all(0)
    keep = [i for i, ok in enumerate(inked.tolist()) if ok]
    return tuple(chars[i] for i in keep), extents, table[:, keep].contiguous()


def _pair_linf(x: torch.Tensor, pairs: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """x: (F, N, D), pairs: (P, 2) -> (P,) max over fonts and dims of |x_i - x_j|."""
    out = [torch.zeros(0)]
    for start in range(0, len(pairs), chunk):
        i, j = pairs[start:start + chunk].unbind(1)
        out.append((x[:, i] - x[:, j]).abs().amax(dim=(0, 2)))
    return torch.cat(out)


def candidate_pairs(table: torch.Tensor, limit: float = PREFILTER) -> np.ndarray:
    """Pairs (i < j) whose renders, box-averaged to 32 x 32, differ by <= limit everywhere.

    table: (F, N, R, R) uint8 -> (P, 2) int64, a fast screen before `envelope_distance`:
    all pairs are screened in the first font, the survivors in every font.
    """
    fonts, count, size = table.shape[:3]
    grid = F.avg_pool2d(table.view(-1, 1, size, size).float().div(255), size // 32)
    grid = grid.view(fonts, count, -1)
    pairs = torch.triu(torch.cdist(grid[0], grid[0], p=float("inf")) <= limit, 1).nonzero()
    return pairs[_pair_linf(grid, pairs) <= limit].numpy()


def envelope_distance(table: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
                      i: int, j: int) -> float:
    """How far glyph i leaves the +-1 px envelope of glyph j (and vice versa), in [0, 1].

    table, low, high: (F, N, R, R) uint8 renders, their 3 x 3 erosions and dilations.
    0 when each render lies between the other's erosion and dilation in every font.
    """
    a, b = table[:, i].to(torch.int16), table[:, j].to(torch.int16)
    excess = torch.stack([
        a - high[:, j], low[:, j] - a, b - high[:, i], low[:, i] - b,
    ])
    return float(excess.amax()) / 255.0


def merge_groups(table: torch.Tensor, tolerance: float = MERGE_TOLERANCE) -> list[list[int]]:
    """Group indistinguishable characters. table: (F, N, R, R) uint8 -> groups of indices.

    A character joins the first earlier group all of whose members are within
    `tolerance` of it (`envelope_distance`; complete linkage, so no chaining).
    """
    high = dilate3(table)
    low = 255 - dilate3(255 - table, pad_value=255)
    close = np.zeros((table.shape[1],) * 2, dtype=bool)
    for i, j in candidate_pairs(table).tolist():
        close[i, j] = close[j, i] = envelope_distance(table, low, high, i, j) <= tolerance
    groups: list[list[int]] = []
    group_of: dict[int, int] = {}
    for index in range(table.shape[1]):
        near = sorted({group_of[j] for j in np.flatnonzero(close[index, :index])})
        fits = [g for g in near if close[index, groups[g]].all()]
        group_of[index] = fits[0] if fits else len(groups)
        if not fits:
            groups.append([])
        groups[group_of[index]].append(index)
    return groups


@functools.lru_cache(maxsize=1)
def glyph_inventory() -> GlyphInventory:
    """All glyph classes, merged and ordered (cached; ~3 s on first call)."""
    chars, extents, table = _compare_table()
    groups = [tuple(chars[i] for i in g) for g in merge_groups(table)]
    classes, family = order_classes(groups)
    return GlyphInventory(FONT_STEMS, tuple(classes), tuple(family), extents)


@functools.lru_cache(maxsize=2)
def base_glyphs(size: int) -> torch.Tensor:
    """Each class's first member in every font: (K, F, size, size) uint8, class order."""
    inventory = glyph_inventory()
    firsts = [members[0] for members in inventory.classes]
    if size == COMPARE_SIZE:
        chars, _, table = _compare_table()
        where = {c: i for i, c in enumerate(chars)}
        return table[:, [where[c] for c in firsts]].transpose(0, 1).contiguous()
    return torch.stack([
        render_canvas(s, firsts, e, size)
        for s, e in zip(inventory.fonts, inventory.extents, strict=True)
    ], dim=1).contiguous()
