import pytest

from orchestration.files import RunDirError, atomic_write_text, read_json
from orchestration.rundir import RunDir


def test_manifest_round_trip_and_completeness(tmp_path):
    run = RunDir(tmp_path / "run")
    out = run.stage_dir("a") / "out.bin"
    out.write_bytes(b"hello")
    m = run.write_manifest("a", config_hash="h1", inputs={}, outputs=["out.bin"], metrics={"x": 1})
    assert run.read_manifest("a") == m
    assert m.outputs["out.bin"] == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert run.is_complete("a", "h1", {}) is None
    assert run.is_complete("a", "h2", {}) == "config changed"
    assert run.is_complete("a", "h1", {"up": "d"}) == "inputs changed"
    out.write_bytes(b"hellO")
    assert run.is_complete("a", "h1", {}) == "output out.bin changed or corrupt"
    out.unlink()
    assert run.is_complete("a", "h1", {}) == "output out.bin missing"


def test_digest_ignores_time_and_metrics(tmp_path):
    run = RunDir(tmp_path)
    (run.stage_dir("a") / "f").write_text("x")
    m1 = run.write_manifest("a", config_hash="h", inputs={}, outputs=["f"], metrics={"t": 1})
    m2 = run.write_manifest("a", config_hash="h", inputs={}, outputs=["f"], metrics={"t": 2})
    assert m1.digest == m2.digest and m1.created <= m2.created


def test_missing_or_garbled_manifest(tmp_path):
    run = RunDir(tmp_path)
    assert run.is_complete("a", "h", {}) == "no manifest"
    run.manifest_path("a").parent.mkdir(parents=True)
    run.manifest_path("a").write_text("{not json")
    assert run.read_manifest("a") is None


def test_atomic_write_leaves_no_temp_files(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_text(path, '{"a": 1}')
    atomic_write_text(path, '{"a": 2}')
    assert read_json(path) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_unwritable_run_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with pytest.raises(RunDirError, match="not writable.*run.dir"):
        RunDir(blocker / "run").ensure_writable()


def test_a_run_directory_as_working_directory_does_not_shadow_the_packages(tmp_path):
    """Ray workers inherit the driver's working directory on sys.path; a run directory's stage
    folders (clustering/, specialists/, ...) must not shadow the packages of the same names."""
    import subprocess
    import sys

    for stage in ("generalist", "clustering", "specialists", "distill"):
        (tmp_path / stage).mkdir()
    code = "import orchestration, clustering, specialists.ensemble; print(clustering.ConfusableGroups.__name__)"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ConfusableGroups", done.stderr[-2000:]
