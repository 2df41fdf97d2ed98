"""The results report: `specdistill report RUN` and the report at the end of `specdistill run`."""

from __future__ import annotations

import shutil

from mlflow.tracking import MlflowClient

from orchestration.cli import main
from orchestration.report import PLOT_GROUPS, PLOT_PARAMS, REPORT_MD


def _copy(finished_run, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(finished_run["root"], root)
    old = str(finished_run["root"])
    args = [a.replace(old, str(root)) for a in finished_run["args"]]
    return root, args


def test_report_command_prints_and_writes_the_report(finished_run, tmp_path, capsys):
    root, _ = _copy(finished_run, tmp_path)
    run = root / "run"
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    assert "generalist" in out and "ensemble" in out and "Table 4" in out and "stability ARI" in out
    text = (run / REPORT_MD).read_text()
    assert "| generalist |" in text and "| ensemble |" in text and "# specialists covering" in text
    assert (run / PLOT_PARAMS).stat().st_size > 1000 and (run / PLOT_GROUPS).stat().st_size > 1000
    assert f"![{PLOT_PARAMS}]({PLOT_PARAMS})" in text


def test_run_ends_with_the_report_logged_to_the_parent_run(finished_run, tmp_path, monkeypatch, capsys):
    root, args = _copy(finished_run, tmp_path)
    monkeypatch.chdir(root)
    assert main(["run", *args, "--to", "ensemble"]) == 0  # every stage is finished: skipped
    out = capsys.readouterr().out
    assert "skip" in out and "specdistill results" in out and f"report: {root / 'run' / REPORT_MD}" in out
    client = MlflowClient(tracking_uri=args[[a.startswith("tracking.uri=") for a in args].index(True)].split("=", 1)[1])
    parent = next(r for r in client.search_runs([client.get_experiment_by_name("specdistill").experiment_id])
                  if "mlflow.parentRunId" not in r.data.tags and r.data.tags.get("specdistill.stage") is None)
    names = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {f"report/{REPORT_MD}", f"report/{PLOT_PARAMS}", "report/models.json"} <= names
    assert "report.generalist.top1" in parent.data.metrics


def test_report_of_a_run_that_has_not_started(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("{}\n")
    assert main(["report", str(tmp_path)]) != 0
    assert "no stage has finished" in capsys.readouterr().err
