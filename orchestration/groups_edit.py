"""Groups a person edits: export them by class name, read an edited file back, check it, diff it.

The file ``specdistill groups RUN --export FILE`` writes (and ``--apply FILE`` or
``clustering.groups_file`` reads)::

    run: /path/to/RUN                 where it was exported from (informative)
    generalist: 3f2a...               the digest of the generalist whose confusions made the groups
    overlapping: false                whether a class may sit in several groups
    groups:                           one list of class names per specialist; a class in no
    - [a, á, à]                       group is left to the generalist alone
    - [o, ó]

Checks (each error names the problem and the fix): an empty file, unknown class names (with the
closest name), a class twice in a group, a class in two groups of a disjoint grouping, a group
of one class, a group of every class, a file exported from another run's generalist.
Pure: no MLflow, no stage; :mod:`orchestration.groups_review` records an edit in a run.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from orchestration.artifacts import GroupsError

SOURCE_COMPUTED, SOURCE_EDITED = "computed", "edited"
_HEADER = """\
# Confusable groups of a specdistill run, by class name: one list per specialist.
# Move, merge, split or drop classes (a class in no group is left to the generalist), then
#   specdistill groups {run} --apply THIS_FILE
# (or set clustering.groups_file: THIS_FILE) and re-run the pipeline: only the specialists whose
# classes changed retrain.
"""


def export_text(record: dict[str, Any], run: Path, generalist_digest: str) -> str:
    """The YAML text of the groups ``record`` (a ``groups.json``) of run ``run``."""
    body = {"run": str(run), "generalist": generalist_digest, "overlapping": bool(record.get("overlapping")),
            "groups": [list(g["names"]) for g in record["groups"]]}
    return _HEADER.format(run=run) + yaml.safe_dump(body, allow_unicode=True, sort_keys=False,
                                                    default_flow_style=None, width=100)


def read_edit(path: Path) -> dict[str, Any]:
    """The parsed edit file; GroupsError when it is missing, not YAML or empty."""
    fix = "export the run's groups with `specdistill groups RUN --export FILE` and edit that file"
    if not path.exists():
        raise GroupsError(f"groups file {path} does not exist; {fix}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise GroupsError(f"groups file {path} is not valid YAML ({exc}); {fix}") from None
    if data is None or (isinstance(data, dict) and not data.get("groups")):
        raise GroupsError(f"groups file {path} is empty: it holds no groups; {fix}")
    if not isinstance(data, dict) or not isinstance(data["groups"], list):
        raise GroupsError(f"groups file {path} must hold a mapping with a 'groups' list of class-name "
                          f"lists; {fix}")
    return data


def check_edit(edit: dict[str, Any], class_names: Sequence[str], *, overlapping: bool,
               generalist_digest: str, path: Path) -> list[list[int]]:
    """The edited groups as class ids, checked against the run's classes and grouping rules."""
    source = edit.get("generalist")
    if source is not None and source != generalist_digest:
        raise GroupsError(
            f"groups file {path} was exported from another run ({edit.get('run', 'unknown run')}, generalist "
            f"{str(source)[:12]}); this run's generalist is {generalist_digest[:12]}, so its class names "
            "and confusions may differ; export this run's groups (specdistill groups RUN --export FILE) "
            "and make the edit there")
    index = {name: i for i, name in enumerate(class_names)}
    groups = [_group_ids(n, group, index, path) for n, group in enumerate(edit["groups"])]
    for n, ids in enumerate(groups):
        _check_size(n, ids, class_names, path)
    if not overlapping:
        _check_disjoint(groups, class_names, path)
    return groups


def _group_ids(n: int, group: Any, index: dict[str, int], path: Path) -> list[int]:
    if not isinstance(group, list):
        raise GroupsError(f"group {n} of {path} must be a list of class names, got {group!r:.80}; "
                          "write it as [name, name, ...]")
    ids: list[int] = []
    for raw in group:
        name = str(raw)
        if name not in index:
            close = difflib.get_close_matches(name, list(index), n=1, cutoff=0.0)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise GroupsError(f"group {n} of {path}: unknown class {name!r}; {hint}use the class names "
                              "the export writes (quote names YAML would read as numbers or booleans)")
        if index[name] in ids:
            raise GroupsError(f"group {n} of {path} lists class {name!r} twice; keep it once")
        ids.append(index[name])
    return ids


def _check_size(n: int, ids: list[int], class_names: Sequence[str], path: Path) -> None:
    if len(ids) < 2:
        what = f"one class ({class_names[ids[0]]!r})" if ids else "no class"
        raise GroupsError(f"group {n} of {path} has {what}: a specialist separates at least 2 classes; "
                          "merge it into another group, or delete it (its class stays with the generalist)")
    if len(ids) == len(class_names):
        raise GroupsError(f"group {n} of {path} holds every one of the {len(class_names)} classes: its "
                          "specialist would be a second generalist with an empty dustbin; split it into "
                          "groups of classes that are confused with each other")


def _check_disjoint(groups: list[list[int]], class_names: Sequence[str], path: Path) -> None:
    seen: dict[int, int] = {}
    for n, ids in enumerate(groups):
        for c in ids:
            if c in seen:
                raise GroupsError(
                    f"class {class_names[c]!r} is in groups {seen[c]} and {n} of {path}, but this run's "
                    "groups are disjoint (overlapping: false); keep it in one group, or re-run "
                    "clustering with overlap (clustering.overlap > 0, or clustering.group_size)")
            seen[c] = n


def edited_record(computed: dict[str, Any], groups: list[list[int]], metrics: dict[str, Any]) -> dict[str, Any]:
    """A ``groups.json`` record for the edited ``groups`` (class ids), from the computed one."""
    names = computed["class_names"]
    covered = {c for g in groups for c in g}
    return {
        **computed,
        "source": SOURCE_EDITED,
        "groups": [{"id": i, "classes": list(g), "names": [names[c] for c in g]} for i, g in enumerate(groups)],
        "unassigned": [c for c in range(len(names)) if c not in covered],
        "metrics": metrics,
    }


def diff_groups(computed: list[dict[str, Any]], edited: list[dict[str, Any]]) -> dict[str, Any]:
    """What an edit changed: per group id the classes added and removed, the groups added and
    removed, and every class whose groups changed (``[]``: the generalist alone)."""
    before = {g["id"]: list(g["names"]) for g in computed}
    after = {g["id"]: list(g["names"]) for g in edited}
    changed = [{"id": i, "added": [c for c in after[i] if c not in before[i]],
                "removed": [c for c in before[i] if c not in after[i]]}
               for i in sorted(before.keys() & after.keys()) if set(before[i]) != set(after[i])]
    moved = []
    for name in dict.fromkeys([c for g in [*before.values(), *after.values()] for c in g]):
        old = [i for i, g in before.items() if name in g]
        new = [i for i, g in after.items() if name in g]
        if old != new:
            moved.append({"class": name, "from": old, "to": new})
    return {"changed_groups": changed,
            "added_groups": [{"id": i, "classes": after[i]} for i in sorted(after.keys() - before.keys())],
            "removed_groups": [{"id": i, "classes": before[i]} for i in sorted(before.keys() - after.keys())],
            "moved_classes": moved}


def diff_markdown(diff: dict[str, Any]) -> str:
    """The diff as a Markdown page (logged to MLflow as ``groups_diff.md``)."""
    lines = ["# Edited groups against the computed ones", ""]
    if not any(diff.values()):
        return "\n".join([*lines, "The edit keeps the computed groups unchanged.", ""])
    lines += ["| class | computed group | edited group |", "| --- | --- | --- |"]
    lines += [f"| {m['class']} | {_ids(m['from'])} | {_ids(m['to'])} |" for m in diff["moved_classes"]]
    lines.append("")
    for g in diff["changed_groups"]:
        lines.append(f"- group {g['id']}: + {', '.join(g['added']) or '-'}; - {', '.join(g['removed']) or '-'}")
    for g in diff["added_groups"]:
        lines.append(f"- new group {g['id']}: {', '.join(g['classes'])}")
    for g in diff["removed_groups"]:
        lines.append(f"- group {g['id']} removed: {', '.join(g['classes'])}")
    return "\n".join([*lines, ""])


def _ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids)) if ids else "(generalist)"
