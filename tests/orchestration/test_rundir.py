import hashlib
import json
from pathlib import Path

import pytest

from orchestration.files import RunDirError, atomic_write_text, read_json
from orchestration.rundir import Manifest, ManifestError, RunDir


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
    path = run.manifest_path("a")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(ManifestError, match=f"manifest {path} is corrupt: not valid JSON"):
        run.read_manifest("a")
    assert run.is_complete("a", "h", {}).startswith(f"manifest {path} is corrupt: not valid JSON")
    good = {"stage": "a", "config_hash": "h", "inputs": {}, "outputs": {}}
    for bad, problem in (({**good, "outputs": ["f"]}, "field 'outputs' must be a JSON object"),
                         ({**good, "inputs": {"g": 1}}, "field 'inputs' must map names to checksum strings"),
                         ({**good, "created": "now"}, "field 'created' must be a number"),
                         ({"stage": "a"}, "it lacks config_hash, inputs, outputs"),
                         ({**good, "extra": 1}, "it has unknown fields extra"),
                         ([1], "it holds a JSON list, not an object")):
        path.write_text(json.dumps(bad))
        assert run.is_complete("a", "h", {}).startswith(f"manifest {path} is corrupt: {problem}")


def test_digest_follows_what_the_outputs_say_not_their_timings(tmp_path):
    """Two runs of a stage that make the same model differ in timings and metrics only: the same
    digest, so downstream stages stay finished; a different model is a different digest."""
    run = RunDir(tmp_path)
    stage = run.stage_dir("a")
    (stage / "w.bin").write_bytes(b"weights")
    digests = []
    for latency, weights in ((0.1, b"weights"), (0.2, b"weights"), (0.2, b"other")):
        (stage / "w.bin").write_bytes(weights)
        (stage / "m.json").write_text(json.dumps({"classes": ["x"], "metrics": {"latency_ms": latency},
                                                  "history": [{"seconds": latency}], "latency_ms": latency}))
        m = run.write_manifest("a", config_hash="h", inputs={}, outputs=["w.bin", "m.json"], metrics={})
        digests.append(m.digest)
    assert digests[0] == digests[1] != digests[2]
    assert m.identity["w.bin"] == m.outputs["w.bin"]            # not JSON: byte for byte
    assert m.identity["m.json"] == hashlib.sha256(b'{"classes":["x"]}').hexdigest()
    legacy = Manifest(**{**m.to_dict(), "identity": {}})      # written before identities existed
    blob = json.dumps(["a", "h", {}, m.outputs], sort_keys=True).encode()
    assert legacy.digest == hashlib.sha256(blob).hexdigest()


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
