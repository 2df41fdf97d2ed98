from pathlib import Path

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


STAGES = ("generalist", "clustering", "specialists", "distill")
DRIVER = f"""
from orchestration.parallel import TaskResources, connect, run_tasks

def probe(item, shared):  # where a worker would import each package from (None: a namespace)
    from importlib.util import find_spec
    return [find_spec(name).origin for name in {STAGES!r}]

results = []
connect(local_num_cpus=1)
failures = run_tasks(probe, [0], shared=None, resources=TaskResources(cpus=1),
                     on_result=lambda item, result: results.append(result))
print("origins", results, "failures", [repr(f.error) for f in failures])
"""


def test_ray_workers_of_a_driver_started_in_a_run_directory_import_the_real_packages(tmp_path):
    """A driver whose working directory is a run directory: Ray would put that directory on its
    workers' sys.path, where the stage folders (clustering/, specialists/, ...) shadow the
    packages of the same names as empty namespace packages."""
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    for stage in STAGES:
        (run / stage).mkdir(parents=True)
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private local Ray
    done = subprocess.run([sys.executable, str(tmp_path / "driver.py")], cwd=run, env=env,
                          capture_output=True, text=True, timeout=300)
    import clustering

    packages = Path(clustering.__file__).parents[1]  # where the real packages are
    expected = [str(packages / stage / "__init__.py") for stage in STAGES]
    assert f"origins [{expected!r}] failures []" in done.stdout, done.stdout + done.stderr[-3000:]
