"""The review pages: a group's page from its numbers, and paging of the overview for large K."""

from __future__ import annotations

import numpy as np

from clustering.review import ConfusionCounts
from orchestration.review import PAGE, group_page, overview_pages, review_entries

COUNTS = ConfusionCounts(true=np.array([0, 0, 1, 2, 3]), predicted=np.array([0, 1, 0, 3, 3]),
                         count=np.array([4, 2, 1, 4, 5]))
NAMES = ["cat", "lynx", "bus", "van"]


def test_entries_rank_groups_by_confusion_share_and_name_the_pairs():
    entries = review_entries([[0, 1], [2, 3]], NAMES, COUNTS)
    assert [e["id"] for e in entries] == [1, 0]                 # 4 of 7 confusions before 3 of 7
    first = {e["id"]: e for e in entries}
    assert first[1]["confusion_share"] == 4 / 7 and first[0]["confusion_share"] == 3 / 7
    assert first[0]["holdout_top1"] == 4 / 7 and first[1]["holdout_top1"] == 5 / 9
    assert first[0]["confused_pairs"][0] == {"true": "cat", "predicted": "lynx", "count": 2}
    page = group_page(first[0], montage=True)
    assert "| cat | lynx | 2 |" in page and "group_000.png" in page and "57.1%" in page
    # hard top-1 counts, named apart from the groups table's share of the soft confusion
    assert "holdout misclassifications (top-1) inside the group: 42.9%" in page


def test_overview_pages_hold_page_rows_and_link_the_next():
    counts = ConfusionCounts(np.arange(2 * 120), np.arange(2 * 120), np.ones(2 * 120, int))
    groups = [[2 * i, 2 * i + 1] for i in range(120)]
    pages = overview_pages(review_entries(groups, [f"c{i}" for i in range(240)], counts), "computed")
    assert len(pages) == 3 and "page 1 of 3" in pages[0]
    assert sum(p.count(".md |") for p in pages) == 120 and pages[0].count(".md |") == PAGE
    assert "overview_002.md" in pages[0] and "overview_003.md" in pages[1] and "Next page" not in pages[2]
