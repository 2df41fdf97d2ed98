"""Which characters the `glyphs` data set uses, and how its classes are ordered.

Candidates are the cased letters and digits of Basic Latin, Latin-1 Supplement, Latin
Extended-A/B, Greek and Cyrillic. Every character is tied to a *base letter* (its
decomposition's first character, or the letter its Unicode name says it is built on:
"LATIN SMALL LETTER O WITH STROKE" -> "o"), and classes sharing a base form a *family*
(a, á, à, â, ä, ã, å, ā, ă, ą, ...). Families are ordered Latin (A, a, B, b, ...), then
Greek, Cyrillic, digits, so a prefix of the class list keeps whole confusable families.
"""

from __future__ import annotations

import re
import unicodedata

CODE_RANGES = (
    (0x30, 0x3A),  # digits
    (0x41, 0x5B),  # A-Z
    (0x61, 0x7B),  # a-z
    (0xC0, 0x250),  # Latin-1 Supplement letters, Latin Extended-A and -B
    (0x370, 0x400),  # Greek and Coptic
    (0x400, 0x500),  # Cyrillic
)
CATEGORIES = ("Lu", "Ll", "Nd")
SCRIPT_RANK = {"LATIN": 0, "GREEK": 1, "CYRILLIC": 2, "DIGIT": 3}

_BUILT_ON = re.compile(r"^(LATIN|GREEK|CYRILLIC) (CAPITAL|SMALL) LETTER (?:DOTLESS )?(.+?)(?: WITH .*)?$")


def candidate_characters() -> list[str]:
    """Cased letters and digits of the blocks in CODE_RANGES, in code point order."""
    chars = (chr(cp) for low, high in CODE_RANGES for cp in range(low, high))
    return [c for c in chars if unicodedata.category(c) in CATEGORIES]


def base_letter(char: str) -> str:
    """The letter `char` is built on: 'á' -> 'a', 'Ё' -> 'Е', 'ø' -> 'o', 'ı' -> 'i'."""
    decomposed = unicodedata.normalize("NFKD", char)
    if decomposed[0] != char and unicodedata.category(decomposed[0]).startswith("L"):
        return base_letter(decomposed[0])
    match = _BUILT_ON.match(unicodedata.name(char, ""))
    if match is None:
        return char
    script, case, letter = match.groups()
    try:
        base = unicodedata.lookup(f"{script} {case} LETTER {letter}")
    except KeyError:
        return char
    return char if base == char else base_letter(base)


def script_rank(char: str) -> int:
    """0 Latin, 1 Greek, 2 Cyrillic, 3 digit (4 for anything else)."""
    return SCRIPT_RANK.get(unicodedata.name(char, "?").split(" ")[0], 4)


def _member_key(char: str) -> tuple[int, int, bool, int]:
    base = base_letter(char)
    return script_rank(char), ord(base.lower()[0]), base.islower(), ord(char)


def group_families(classes: list[tuple[str, ...]]) -> list[int]:
    """Family id per class: classes are joined when any members share a base letter."""
    parent = list(range(len(classes)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for index, members in enumerate(classes):
        for key in {base_letter(c) for c in members} | set(members):
            if key in owner:
                parent[find(index)] = find(owner[key])
            else:
                owner[key] = index
    roots = [find(i) for i in range(len(classes))]
    relabel = {root: n for n, root in enumerate(dict.fromkeys(roots))}
    return [relabel[r] for r in roots]


def order_classes(classes: list[tuple[str, ...]]) -> tuple[list[tuple[str, ...]], list[int]]:
    """Classes sorted family by family (Latin A, a, B, b, ..., Greek, Cyrillic, digits).

    Within a family the plain letter comes first, then its variants by code point.
    Returns (ordered classes, family id per ordered class, numbered 0.. in order).
    """
    family = group_families(classes)
    family_key: dict[int, tuple] = {}
    for members, fam in zip(classes, family, strict=True):
        key = min(_member_key(c) for c in members)
        family_key[fam] = min(family_key.get(fam, key), key)

    def class_key(index: int) -> tuple:
        first = classes[index][0]
        derived = base_letter(first) != first
        return family_key[family[index]], derived, script_rank(first), ord(first)

    order = sorted(range(len(classes)), key=class_key)
    renumber = {fam: n for n, fam in enumerate(dict.fromkeys(family[i] for i in order))}
    return [classes[i] for i in order], [renumber[family[i]] for i in order]


def class_name(members: tuple[str, ...]) -> str:
    """Human-readable class name: the member characters joined with '/' ("A/Α/А")."""
    return "/".join(members)
