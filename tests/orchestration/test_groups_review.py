"""Review, edit and approve the groups through the CLI: export, apply, the checks, the gate, and
re-running only the specialists whose classes changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestration.cli import main

# Four groups asked of 9 classes: at least one holds 3 classes, so a class can leave it.
LOOP = ("clustering.n_groups=4", "specialists.epochs=1", "specialists.batch_size=32",
        "specialists.finetune=head", "specialists.same_compute=false", "ensemble.batch_size=16",
        "ensemble.cache.enabled=false")


def _move_one_class(path: Path) -> tuple[int, int, str]:
    """Move the last class of the first group of 3+ classes to the next group; returns both ids."""
    data = yaml.safe_load(path.read_text())
    groups = data["groups"]
    source = next(i for i, g in enumerate(groups) if len(g) >= 3)
    target = (source + 1) % len(groups)
    name = groups[source].pop()
    groups[target].append(name)
    path.write_text(yaml.safe_dump(data, allow_unicode=True))
    return source, target, name


def _runs(uri: str, stage: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("specdistill")
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("specdistill.stage") == stage]


def test_export_edit_apply_approve_retrains_exactly_the_changed_specialists(tiny_args, workdir, capsys):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    args, run = tiny_args(*LOOP, "clustering.require_approval=true"), workdir / "run"
    assert main(["run", *args, "--to", "ensemble"]) == 0
    out = capsys.readouterr().out
    assert "stopped after clustering: waiting for approval" in out and "--approve" in out
    assert "/#/experiments/" in out and not (run / "specialists" / "manifest.json").exists()

    assert main(["groups", str(run), "--approve"]) == 0
    assert json.loads((run / "clustering" / "approval.json").read_text())["source"] == "computed"
    assert main(["run", *args, "--to", "ensemble"]) == 0
    assert (run / "ensemble" / "manifest.json").exists()
    n_groups = len(json.loads((run / "clustering" / "groups.json").read_text())["groups"])
    before = {r.info.run_id for r in _runs(uri, "specialists") if "specdistill.group_id" in r.data.tags}
    assert len(before) == n_groups >= 3

    edit = workdir / "groups.yaml"
    assert main(["groups", str(run), "--export", str(edit)]) == 0
    source, target, name = _move_one_class(edit)
    assert main(["groups", str(run), "--apply", str(edit)]) == 0
    record = json.loads((run / "clustering" / "groups.json").read_text())
    assert record["source"] == "edited" and name in record["groups"][target]["names"]
    diff = json.loads((run / "clustering" / "groups_diff.json").read_text())
    assert diff["moved_classes"] == [{"class": name, "from": [source], "to": [target]}]
    capsys.readouterr()
    assert main(["groups", str(run)]) == 0
    assert "unassigned (edited)" in capsys.readouterr().out

    assert main(["run", *args, "--to", "ensemble"]) == 0
    assert "waiting for approval" in capsys.readouterr().out, "an edit voids the approval"
    assert main(["groups", str(run), "--approve"]) == 0
    assert main(["run", *args, "--to", "ensemble"]) == 0
    out = capsys.readouterr().out
    assert f"{n_groups - 2} kept from the result this one replaces" in out and "2 to train" in out
    assert "stage ensemble (inputs changed)" in out
    index = json.loads((run / "specialists" / "specialists.json").read_text())["specialists"]
    assert [e["names"] for e in index] == [g["names"] for g in record["groups"]]
    new = [r for r in _runs(uri, "specialists") if "specdistill.group_id" in r.data.tags
           and r.info.run_id not in before]
    assert sorted(int(r.data.tags["specdistill.group_id"]) for r in new) == sorted([source, target])

    clustering = _runs(uri, "clustering")[0]
    assert clustering.data.tags["specdistill.groups_source"] == "edited"
    history = MlflowClient(uri).get_metric_history(clustering.info.run_id, "n_specialist_groups")
    assert [(m.step, m.value) for m in history][-1] == (1, len(record["groups"])), "the edit's metrics"
    assert clustering.data.tags["specdistill.groups_approved"] == "true"
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(clustering.info.run_id, "edit")}
    assert "edit/groups_diff.md" in artifacts
    review = {a.path for a in MlflowClient(uri).list_artifacts(clustering.info.run_id, "review")}
    assert {"review/overview.md", "review/groups_review.json"} <= review
    assert {f"review/group_{i:03d}{ext}" for i in range(n_groups) for ext in (".md", ".png")} <= review
    overview = Path(MlflowClient(uri).download_artifacts(clustering.info.run_id, "review/overview.md"))
    assert "Groups (edited)" in overview.read_text(), "the pages show the groups the specialists train on"


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A writable copy of the session's finished tiny run (same MLflow store)."""
    path = tmp_path / "run"
    shutil.copytree(finished_run["path"], path)
    return path


def _export(run: Path, tmp_path: Path) -> tuple[Path, dict]:
    path = tmp_path / "groups.yaml"
    assert main(["groups", str(run), "--export", str(path)]) == 0
    return path, yaml.safe_load(path.read_text())


def _names(run: Path) -> list[str]:
    return json.loads((run / "clustering" / "groups.json").read_text())["class_names"]


def _unknown(data, names):
    data["groups"][0][0] = data["groups"][0][0][:-1] + "X"
    return f"unknown class '{data['groups'][0][0]}'; did you mean"


def _twice(data, names):
    data["groups"][1].append(data["groups"][0][0])
    return f"class '{data['groups'][0][0]}' is in groups 0 and 1"


def _single(data, names):
    data["groups"].append([data["groups"][0].pop()] if len(data["groups"][0]) > 2 else [names[0]])
    data["groups"] = [g for g in data["groups"] if g]
    return "has one class"


def _every(data, names):
    data["groups"] = [list(names)]
    return f"holds every one of the {len(names)} classes"


def _empty(data, names):
    data.clear()
    return "is empty: it holds no groups"


def _other_run(data, names):
    data["generalist"] = "0" * 64
    return "was exported from another run"


@pytest.mark.parametrize("edit", [_unknown, _twice, _single, _every, _empty, _other_run])
def test_bad_edits_are_refused_and_change_nothing(run_copy, tmp_path, capsys, edit):
    path, data = _export(run_copy, tmp_path)
    groups_before = (run_copy / "clustering" / "groups.json").read_bytes()
    message = edit(data, _names(run_copy))
    path.write_text(yaml.safe_dump(data, allow_unicode=True) if data else "")
    capsys.readouterr()
    assert main(["groups", str(run_copy), "--apply", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "error:" in err
    assert (run_copy / "clustering" / "groups.json").read_bytes() == groups_before


def test_unknown_class_names_the_closest_match(run_copy, tmp_path, capsys):
    path, data = _export(run_copy, tmp_path)
    right = data["groups"][0][0]
    data["groups"][0][0] = right.replace("_", "")
    path.write_text(yaml.safe_dump(data))
    assert main(["groups", str(run_copy), "--apply", str(path)]) == 2
    assert f"did you mean '{right}'?" in capsys.readouterr().err


def test_approval_without_a_grouping_says_to_run_clustering(tiny_args, workdir, capsys):
    assert main(["generalist", *tiny_args()]) == 0
    capsys.readouterr()
    assert main(["groups", str(workdir / "run"), "--approve"]) == 2
    err = capsys.readouterr().err
    assert "has no grouping yet" in err and "--to clustering" in err


def test_groups_file_key_applies_the_edit_in_the_stage(run_copy, finished_run, tmp_path, capsys):
    path, data = _export(run_copy, tmp_path)
    source, target, name = _move_one_class(path)
    args = [a for a in finished_run["args"] if not a.startswith(("run.dir=", "tracking.uri="))]
    assert main(["clustering", f"run.dir={run_copy}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
                 *args, f"clustering.groups_file={path}"]) == 0
    out = capsys.readouterr().out
    assert "stage clustering (inputs changed)" in out and "groups edited by" in out
    assert "changed: its input groups_file (what a config key names)" in out
    assert "holdout pass: 72 examples, 9 classes in" in out, "the long step says what it did"
    record = json.loads((run_copy / "clustering" / "groups.json").read_text())
    assert record["source"] == "edited" and name in record["groups"][target]["names"]
    manifest = json.loads((run_copy / "clustering" / "manifest.json").read_text())
    assert "groups_diff.md" in manifest["outputs"] and manifest["details"]["groups_source"] == "edited"


def test_approval_is_kept_on_disk_when_mlflow_does_not_answer(run_copy, free_port, capsys):
    record = json.loads((run_copy / "run.json").read_text())
    record["tracking_uri"] = f"http://127.0.0.1:{free_port()}"
    (run_copy / "run.json").write_text(json.dumps(record))
    assert main(["groups", str(run_copy), "--approve"]) == 1
    err = capsys.readouterr().err
    assert "but MLflow did not take it" in err and "--approve` again" in err
    assert (run_copy / "clustering" / "approval.json").exists()
