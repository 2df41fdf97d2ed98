"""The review pages of a grouping, logged to the clustering stage's MLflow run under ``review/``.

    review/overview.md            the groups, most confusion first: size, the generalist's holdout
                                  top-1 inside the group, its share of the holdout misclassifications,
                                  its most confused pair, the names of its page and montage; PAGE rows
                                  a page
    review/overview_002.md, ...   the next pages (K in the thousands stays readable)
    review/group_NNN.md           one group: its classes, those numbers, its most confused pairs with
                                  the generalist's holdout confusion counts
    review/group_NNN.png          a montage: IMAGES_PER_CLASS training images per class, the class
                                  names beside them (the first MONTAGE_CLASSES classes of a group)
    review/groups_review.json     all of it as data, every group

Montages are drawn for the MONTAGES groups with the most confusion; the others have a page only.
The pages count hard holdout predictions (``confusion_share``: the group's share of the examples
the generalist's top-1 put in the wrong class); the groups table's ``confusion_share`` is the
share of its soft confusion (probability mass), so the two differ by a few points per group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from clustering.review import ConfusionCounts, group_montage, group_stats
from orchestration.tracking import RunLogger

PAGE, MONTAGES, IMAGES_PER_CLASS, MONTAGE_CLASSES, TOP_PAIRS = 50, 50, 6, 30, 10


def review_entries(groups: Sequence[Sequence[int]], names: Sequence[str],
                   counts: ConfusionCounts) -> list[dict[str, Any]]:
    """One entry per group (``id`` = its position), most confusion share first."""
    entries = []
    for gid, group in enumerate(groups):
        stats = group_stats(counts, group, top=TOP_PAIRS)
        entries.append({
            "id": gid, "size": len(group), "classes": [names[c] for c in group],
            "holdout_examples": stats.examples, "holdout_top1": stats.accuracy,
            "confusion_share": stats.confusion_share,
            "confused_pairs": [{"true": names[t], "predicted": names[p], "count": c} for t, p, c in stats.pairs],
        })
    return sorted(entries, key=lambda e: (-e["confusion_share"], e["id"]))


def group_page(entry: dict[str, Any], montage: bool) -> str:
    """The Markdown page of one group."""
    gid = entry["id"]
    lines = [f"# Group {gid}: {entry['size']} classes", "",
             f"- generalist holdout top-1 inside the group: {_pct(entry['holdout_top1'])} "
             f"({entry['holdout_examples']} holdout examples)",
             f"- share of the generalist's holdout misclassifications (top-1) inside the group: "
             f"{entry['confusion_share']:.1%}",
             f"- montage: {f'group_{gid:03d}.png' if montage else f'none (only the {MONTAGES} groups with the most confusion have one)'}",
             "", "Classes: " + ", ".join(entry["classes"]), "", "## Most confused pairs (holdout counts)", ""]
    if not entry["confused_pairs"]:
        return "\n".join([*lines, "The generalist confused no two classes of this group on the holdout split.", ""])
    lines += ["| true class | predicted as | count |", "| --- | --- | ---: |"]
    lines += [f"| {p['true']} | {p['predicted']} | {p['count']} |" for p in entry["confused_pairs"]]
    return "\n".join([*lines, ""])


def overview_pages(entries: list[dict[str, Any]], source: str) -> list[str]:
    """The overview table, PAGE groups a page, each page linking the next."""
    chunks = [entries[i:i + PAGE] for i in range(0, len(entries), PAGE)] or [[]]
    pages = []
    for n, chunk in enumerate(chunks):
        lines = [f"# Groups ({source}): page {n + 1} of {len(chunks)}", "",
                 f"{len(entries)} groups, most confusion first. Each group has a page review/group_NNN.md; "
                 f"the first {MONTAGES} a montage review/group_NNN.png. All of it: review/groups_review.json.", "",
                 "Columns: the generalist's holdout top-1 on the group's classes, the group's share of all "
                 "its holdout misclassifications (top-1 predictions; the groups table's confusion share counts "
                 "probability mass instead), its most confused pair (true -> predicted, count).", "",
                 "| group | size | top-1 | share | top pair | page |",
                 "| ---: | ---: | ---: | ---: | --- | --- |"]
        for e in chunk:
            pair = e["confused_pairs"][0] if e["confused_pairs"] else None
            shown = f"{pair['true']} -> {pair['predicted']} ({pair['count']})" if pair else "-"
            lines.append(f"| {e['id']} | {e['size']} | {_pct(e['holdout_top1'])} | {e['confusion_share']:.1%} "
                         f"| {shown} | group_{e['id']:03d}.md |")
        if n + 1 < len(chunks):
            lines += ["", f"Next page: review/{_overview_name(n + 1)}"]
        pages.append("\n".join([*lines, ""]))
    return pages


def _overview_name(n: int) -> str:
    return "overview.md" if n == 0 else f"overview_{n + 1:03d}.md"


def _pct(value: float) -> str:
    return "n/a" if np.isnan(value) else f"{value:.1%}"


def class_images(images, labels, classes: Sequence[int], n: int = IMAGES_PER_CLASS) -> list[np.ndarray]:
    """The first ``n`` training images ``(n, C, H, W) uint8`` of each class in ``classes``."""
    labels = np.asarray(labels)
    return [np.asarray(images[np.flatnonzero(labels == c)[:n]]) for c in classes]


def log_review(logger: RunLogger, groups: Sequence[Sequence[int]], names: Sequence[str],
               counts: ConfusionCounts, train, source: str) -> list[dict[str, Any]]:
    """Log the review pages of ``groups`` (``train``: a split with ``images``, ``labels``)."""
    entries = review_entries(groups, names, counts)
    for rank, entry in enumerate(entries):
        montage = rank < MONTAGES
        if montage:
            shown = list(groups[entry["id"]])[:MONTAGE_CLASSES]
            fig = group_montage(class_images(train.images, train.labels, shown),
                                [names[c] for c in shown], _montage_title(entry))
            logger.log_figure(fig, f"review/group_{entry['id']:03d}.png")
        logger.log_text(group_page(entry, montage), f"review/group_{entry['id']:03d}.md")
    for n, page in enumerate(overview_pages(entries, source)):
        logger.log_text(page, f"review/{_overview_name(n)}")
    logger.log_dict(entries, "review/groups_review.json")
    return entries


def _montage_title(entry: dict[str, Any]) -> str:
    more = entry["size"] - MONTAGE_CLASSES
    return (f"group {entry['id']}: {entry['size']} classes{f' (first {MONTAGE_CLASSES}; {more} more)' if more > 0 else ''}, "
            f"generalist holdout top-1 {_pct(entry['holdout_top1'])}, share of misclassifications "
            f"{entry['confusion_share']:.1%}")
