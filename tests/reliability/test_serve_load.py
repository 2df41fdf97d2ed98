"""Ray Serve under load: 400 requests from 200 concurrent clients on 127.0.0.1 against one
`specdistill serve` (started through the CLI), malformed requests interleaved. Every good
request gets the right answer, every bad one its 4xx, and the latency percentiles are printed
(run with -s to see them) and written to ``serve_load.json`` in the test's temporary folder."""

from __future__ import annotations

import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from generalist.data import create_dataset
from orchestration.ensemble_api import Ensemble

CLIENTS, REQUESTS, BAD_EVERY = 200, 400, 8


@pytest.fixture(scope="module")
def server(finished_run, tmp_path_factory):
    """`specdistill serve --port 0`: up once its banner names the URL it bound."""
    log = tmp_path_factory.mktemp("serve-load") / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "orchestration.cli", "serve", str(finished_run["path"]),
                                 "--port", "0", "--max-batch-size", "64", "--batch-wait-ms", "10"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + 180
    while "Ctrl-C" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"server not up:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    url = re.search(r"serving \S+ at (http://\S+) on ", log.read_text(errors="replace")).group(1)
    yield url
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _post(url: str, body: bytes) -> tuple[int, dict, float]:
    request = urllib.request.Request(url + "/v1/soft_targets", data=body,
                                     headers={"Content-Type": "application/json"}, method="POST")
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, payload = response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, json.loads(exc.read() or b"{}")
    return status, payload, time.perf_counter() - started


def test_200_concurrent_clients_with_malformed_requests_interleaved(server, finished_run, tmp_path):
    images = create_dataset("hierarchy", seed=0, num_superclasses=3, classes_per_superclass=3,
                            train_per_class=24, holdout_per_class=8, test_per_class=8, image_size=16).test.images
    expected = Ensemble.load(finished_run["path"]).soft_targets(images)
    bad_bodies = [b"{not json", json.dumps({"inputs": [[1, 2, 3]]}).encode(),
                  json.dumps({"inputs": images[:1].tolist(), "top_k": 0}).encode()]

    def job(i: int) -> tuple[int, str, int, dict, float]:
        if i % BAD_EVERY == BAD_EVERY - 1:
            status, payload, seconds = _post(server, bad_bodies[i % len(bad_bodies)])
            return i, "bad", status, payload, seconds
        k = i % len(images)
        body = json.dumps({"inputs": images[k:k + 1].tolist(), "top_k": 3}).encode()
        status, payload, seconds = _post(server, body)
        return i, "good", status, payload, seconds

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        results = list(pool.map(job, range(REQUESTS)))
    wall = time.perf_counter() - started

    good = [r for r in results if r[1] == "good"]
    bad = [r for r in results if r[1] == "bad"]
    assert [r[2] for r in good] == [200] * len(good), {r[2] for r in good}
    for i, _, _, payload, _ in good:
        k = i % len(images)
        top = payload["results"][0]["top_k"]
        best = int(expected[k].argmax())
        assert top[0]["probability"] == pytest.approx(float(expected[k, best]), abs=1e-6)
    assert all(400 <= r[2] < 500 and r[3].get("error") for r in bad), [(r[2], r[3]) for r in bad]

    latencies = sorted(r[4] for r in good)
    q = statistics.quantiles(latencies, n=100)
    figures = {"requests": REQUESTS, "clients": CLIENTS, "good": len(good), "bad": len(bad),
               "wall_s": wall, "requests_per_s": REQUESTS / wall,
               "p50_ms": 1000 * q[49], "p95_ms": 1000 * q[94], "p99_ms": 1000 * q[98],
               "max_ms": 1000 * latencies[-1]}
    (tmp_path / "serve_load.json").write_text(json.dumps(figures, indent=2))
    print("serve load: " + " ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                    for k, v in figures.items()))
    with urllib.request.urlopen(server + "/healthz", timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"  # still serving after the storm
    assert torch.isfinite(torch.tensor(latencies)).all()
