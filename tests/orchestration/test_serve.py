"""`specdistill serve` for real: the CLI entry point starts Ray Serve in a subprocess on
127.0.0.1 (one server for the module), and the tests talk HTTP to it with urllib.

Answers are compared with ``Ensemble.load(run).soft_targets`` computed in the test process; bad
requests each get their 4xx with a JSON error while the server keeps serving; 16 concurrent
clients all get correct answers (and their requests share batches); SIGINT stops the server
and every process it started. A run directory that does not exist, or a port in use, fails
with a clear message before Ray starts.
"""

from __future__ import annotations

import io
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from ray.exceptions import RayTaskError

from generalist.data import create_dataset
from orchestration.ensemble_api import Ensemble
from orchestration.local_ray import descendants
from orchestration.serve import ServeError, ServeOptions
from orchestration.serve_protocol import (
    RequestError,
    parse_image_request,
    parse_json_request,
    parse_npy_request,
    parse_options,
)

MAX_INPUTS = 32
MAX_PAYLOAD_MB = 0.25
START_TIMEOUT_S = 180


def _private_ray_env() -> dict[str, str]:
    """The environment, minus RAY_ADDRESS: the server starts its own local Ray."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path) -> None:
        self.proc, self.url, self.log = proc, url, log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def request(self, path: str, body: bytes | None = None, *, content_type: str | None = None,
                method: str | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if content_type:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def post_json(self, payload: dict) -> tuple[int, dict]:
        return self.request("/v1/soft_targets", json.dumps(payload).encode(), content_type="application/json")


@pytest.fixture(scope="module")
def run_dir(finished_run) -> Path:
    return Path(finished_run["path"])


@pytest.fixture(scope="module")
def ensemble(run_dir) -> Ensemble:
    return Ensemble.load(run_dir)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    data = create_dataset("hierarchy", seed=0, num_superclasses=3, classes_per_superclass=3,
                          train_per_class=24, holdout_per_class=8, test_per_class=8, image_size=16)
    return data.test.images  # (72, 1, 16, 16) uint8


def _start_server(run_dir: Path, log: Path, *options: str) -> Server:
    """`specdistill serve RUN --port 0` in a subprocess; returns once the banner (printed after
    /healthz answers) names the URL it bound."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "orchestration.cli", "serve", str(run_dir), "--port", "0", *options],
            stdout=out, stderr=subprocess.STDOUT, env=_private_ray_env(),
        )
    deadline = time.time() + START_TIMEOUT_S
    while True:
        text = log.read_text(errors="replace")
        if "Ctrl-C" in text:
            url = re.search(r"serving \S+ at (http://\S+) on ", text).group(1)
            return Server(proc, url, log)
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{text[-4000:]}")
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"the server was not up in {START_TIMEOUT_S} s:\n{text[-4000:]}")
        time.sleep(0.5)


def _stop(server: Server) -> None:
    """SIGTERM the server (SIGKILL if it hangs) and SIGKILL whatever of it is left."""
    if server.proc.poll() is None:
        family = descendants(server.proc.pid)
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()
        for pid in _alive(family):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def server(run_dir, tmp_path_factory):
    """`specdistill serve RUN --port 0`, small limits so the 413s need small bodies."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    srv = _start_server(run_dir, log, "--max-inputs", str(MAX_INPUTS), "--max-payload-mb",
                        str(MAX_PAYLOAD_MB), "--max-batch-size", "16", "--batch-wait-ms", "20")
    yield srv
    _stop(srv)  # the shutdown test did not run (e.g. -k): stop it anyway


def _address(hex_address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """``/proc/net/tcp*`` ``ADDR:PORT`` hex (host byte order per 32-bit word) -> the address."""
    raw = bytes.fromhex(hex_address.split(":")[0])
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(words)


def _listening(pids: set[int]) -> list[tuple]:
    """``(pid, protocol, "address:port", address)`` of every listening TCP / bound UDP socket of
    ``pids``."""
    sockets = {}
    for protocol, wanted in (("tcp", "0A"), ("tcp6", "0A"), ("udp", "07"), ("udp6", "07")):
        for line in Path(f"/proc/net/{protocol}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == wanted:
                port = int(fields[1].split(":")[1], 16)
                sockets[fields[9]] = (protocol, _address(fields[1]), port)
    found = []
    for pid in pids:
        try:
            links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:  # gone, or a file descriptor closed while listed
            continue
        for link in links:
            if link.startswith("socket:[") and link[8:-1] in sockets:
                protocol, address, port = sockets[link[8:-1]]
                found.append((pid, protocol, f"{address}:{port}", address))
    return found


def _loopback(address) -> bool:
    mapped = getattr(address, "ipv4_mapped", None)
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _check_results(results: list[dict], expected: torch.Tensor, top_k: int, class_names: list[str]) -> None:
    """Each result's top-k = the k largest of the expected dense row (same probabilities)."""
    assert len(results) == len(expected)
    for result, row in zip(results, expected, strict=True):
        pairs = result["top_k"]
        assert len(pairs) == top_k
        probs = [p["probability"] for p in pairs]
        assert probs == sorted(probs, reverse=True)
        for pair in pairs:
            assert pair["probability"] == pytest.approx(float(row[class_names.index(pair["class"])]), abs=1e-6)
        assert probs[-1] == pytest.approx(float(row.topk(top_k).values[-1]), abs=1e-6)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _png(image: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image[0].numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def test_parsing_without_a_server():
    shape = (1, 4, 4)
    q = parse_json_request(json.dumps({"inputs": [[[[255] * 4] * 4]], "top_k": 2}).encode(), shape, 9, 8)
    assert q.images.shape == (1, 1, 4, 4) and float(q.images.max()) == 1.0 and q.top_k == 2
    assert parse_options(None, None, 3) == (3, 1.0)
    assert parse_options("4", "0.5", 9) == (4, 0.5)
    for top_k, temperature in ((0, None), (10, None), ("x", None), (True, None), (None, 0), (None, "nan")):
        with pytest.raises(RequestError) as err:
            parse_options(top_k, temperature, 9)
        assert err.value.status == 422
    bad = [
        (400, lambda: parse_json_request(b"{not json", shape, 9, 8)),
        (422, lambda: parse_json_request(b'{"inputs": [[[[0.5, 2]]]]}', shape, 9, 8)),
        (413, lambda: parse_json_request(json.dumps({"inputs": [[[[0] * 4] * 4]] * 9}).encode(), shape, 9, 8)),
        (400, lambda: parse_npy_request(b"PK\x03\x04", {}, shape, 9, 8)),
        (422, lambda: parse_npy_request(_npy(np.zeros((1, 1, 4, 4), np.int16)), {}, shape, 9, 8)),
        (422, lambda: parse_image_request(b"x", {"top_k": "0"}, shape, 9)),
        (400, lambda: parse_image_request(b"", {}, shape, 9)),
    ]
    for status, call in bad:
        with pytest.raises(RequestError) as err:
            call()
        assert err.value.status == status, err.value.message
    with pytest.raises(ServeError, match="--max-inputs must be an integer >= 1"):
        ServeOptions(max_inputs=0)


def test_port_zero_takes_another_free_port_when_the_first_is_taken_before_the_proxy_binds(monkeypatch):
    """The race of picking a free port and then binding it: the proxy's bind failure (as Ray Serve
    reports it) makes start() shut Serve down and try a fresh port; an explicit port is not retried."""
    from ray import serve

    from orchestration.serve import _start_proxy

    calls: list = []

    def start(proxy_location: str, http_options: dict) -> None:
        calls.append(http_options["port"])
        if len(calls) == 1:
            raise RayTaskError("ProxyActor.ready", "RuntimeError: Failed to bind to address "
                               f"'127.0.0.1:{http_options['port']}'.", RuntimeError("Failed to bind"))

    monkeypatch.setattr(serve, "start", start)
    monkeypatch.setattr(serve, "shutdown", lambda: calls.append("shutdown"))
    assert _start_proxy("127.0.0.1", 0, owns_ray=True) == calls[2]
    assert calls[1] == "shutdown" and 0 < calls[0] != calls[2] > 0
    calls.clear()
    with pytest.raises(ServeError, match="cannot listen on 127.0.0.1:8123: the port was taken just before"):
        _start_proxy("127.0.0.1", 8123, owns_ray=True)
    with pytest.raises(ServeError, match="--port 0 .* needs the private local Ray"):
        _start_proxy("127.0.0.1", 0, owns_ray=False)


def test_health_and_classes(server, run_dir, ensemble):
    status, health = server.request("/healthz")
    assert status == 200 and health["status"] == "ok"
    assert Path(health["run_dir"]) == run_dir.resolve()
    assert health["num_classes"] == 9 and health["image_shape"] == [1, 16, 16]
    assert health["limits"]["max_inputs"] == MAX_INPUTS
    status, classes = server.request("/v1/classes")
    assert status == 200 and classes["classes"] == ensemble.class_names
    out = server.output()
    assert server.url in out and "curl" in out


def test_the_private_ray_listens_on_loopback_only(server):
    """Every socket the server's processes listen on (GCS, raylet, workers, Serve controller and
    proxy, dashboard and runtime-env agents, metrics ports, the HTTP proxy) is on 127.0.0.1."""
    family = descendants(server.proc.pid) | {server.proc.pid}
    sockets = _listening(family)
    names = {Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode() for pid, *_ in sockets}
    assert len(sockets) >= 8 and any("gcs_server" in n for n in names) and any("raylet" in n for n in names), sockets
    exposed = [(pid, protocol, where) for pid, protocol, where, address in sockets if not _loopback(address)]
    assert not exposed, exposed
    assert any(where.endswith(f":{server.url.rsplit(':', 1)[1]}") for _, _, where, _ in sockets)


def test_json_npy_png_match_the_ensemble(server, ensemble, images):
    names = ensemble.class_names
    x = images[:5]
    # uint8 as JSON integers, default top_k (5) and temperature (1)
    status, body = server.post_json({"inputs": x.tolist()})
    assert status == 200, body
    _check_results(body["results"], ensemble.soft_targets(x), 5, names)
    # floats in [0, 1], softened
    status, body = server.post_json({"inputs": (x.float() / 255).tolist(), "top_k": 3, "temperature": 2.5})
    assert status == 200, body
    _check_results(body["results"], ensemble.soft_targets(x, temperature=2.5), 3, names)
    # npy, uint8 and float32
    expected = ensemble.soft_targets(images[:20], temperature=0.5)
    status, body = server.request("/v1/soft_targets/npy?top_k=9&temperature=0.5", _npy(images[:20].numpy()))
    assert status == 200, body
    _check_results(body["results"], expected, 9, names)
    status, body = server.request("/v1/soft_targets/npy?top_k=2", _npy(images[:3].numpy().astype(np.float32) / 255))
    assert status == 200, body
    _check_results(body["results"], ensemble.soft_targets(images[:3]), 2, names)
    # one PNG
    status, body = server.request("/v1/soft_targets/png?top_k=4", _png(images[7]), content_type="image/png")
    assert status == 200, body
    _check_results(body["results"], ensemble.soft_targets(images[7:8]), 4, names)


def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, ensemble, images):
    one = images[:1]
    big = np.zeros((1, 1, 16, 16), np.uint8).tolist()
    cases = {
        "non-JSON body": (400, "/v1/soft_targets", b"inputs=1", "JSON"),
        "JSON but not an object": (422, "/v1/soft_targets", b"[1, 2]", "inputs"),
        "missing inputs": (422, "/v1/soft_targets", b'{"top_k": 3}', "inputs"),
        "unknown field": (422, "/v1/soft_targets", json.dumps({"inputs": big, "topk": 3}).encode(), "topk"),
        "wrong shape": (422, "/v1/soft_targets", json.dumps({"inputs": [[[0] * 8] * 8]}).encode(), "(N, 1, 16, 16)"),
        "single image unwrapped": (422, "/v1/soft_targets", json.dumps({"inputs": big[0]}).encode(), "wrap"),
        "ragged": (422, "/v1/soft_targets", json.dumps({"inputs": [[[[0, 1], [0]]]]}).encode(), "ragged"),
        "strings": (422, "/v1/soft_targets", json.dumps({"inputs": [[[["a"] * 16] * 16]]}).encode(), "numbers"),
        "out of range uint8": (422, "/v1/soft_targets", json.dumps({"inputs": [[[[300] * 16] * 16]]}).encode(), "0..255"),
        "out of range float": (422, "/v1/soft_targets", json.dumps({"inputs": [[[[1.5] * 16] * 16]]}).encode(), "[0, 1]"),
        "bad top_k": (422, "/v1/soft_targets", json.dumps({"inputs": big, "top_k": 10}).encode(), "top_k"),
        "bad temperature": (422, "/v1/soft_targets", json.dumps({"inputs": big, "temperature": -1}).encode(), "temperature"),
        "too many inputs": (413, "/v1/soft_targets", json.dumps({"inputs": big * (MAX_INPUTS + 1)}).encode(), str(MAX_INPUTS)),
        "oversize payload": (413, "/v1/soft_targets", b" " * int(MAX_PAYLOAD_MB * 2**20 + 1), "MiB"),
        "npy not npy": (400, "/v1/soft_targets/npy", b"hello", ".npy"),
        "npy wrong dtype": (422, "/v1/soft_targets/npy", _npy(one.numpy().astype(np.int64)), "uint8"),
        "npy wrong shape": (422, "/v1/soft_targets/npy", _npy(np.zeros((2, 3, 16, 16), np.uint8)), "(N, 1, 16, 16)"),
        "npy too many": (413, "/v1/soft_targets/npy", _npy(np.zeros((MAX_INPUTS + 1, 1, 16, 16), np.uint8)), str(MAX_INPUTS)),
        "npy object": (422, "/v1/soft_targets/npy", _npy(np.array([None, 1], dtype=object)), "objects"),
        "npy bad top_k": (422, "/v1/soft_targets/npy?top_k=abc", _npy(one.numpy()), "top_k"),
        "npy unknown param": (422, "/v1/soft_targets/npy?k=3", _npy(one.numpy()), "unknown query"),
        "png not an image": (400, "/v1/soft_targets/png", b"\x89PNG garbage", "image"),
        "png wrong size": (422, "/v1/soft_targets/png", _png(torch.zeros(1, 8, 8, dtype=torch.uint8)), "16x16"),
        "png bad temperature": (422, "/v1/soft_targets/png?temperature=0", _png(one[0]), "temperature"),
    }
    for name, (expected_status, path, body, needle) in cases.items():
        status, answer = server.request(path, body)
        assert status == expected_status, (name, answer)
        assert needle in answer["error"], (name, answer)
        ok, good = server.post_json({"inputs": one.tolist(), "top_k": 1})  # still serving
        assert ok == 200, (name, good)
    for path, method, code in (("/v1/nope", "GET", 404), ("/", "GET", 404), ("/v1/soft_targets", "GET", 405)):
        status, answer = server.request(path, method=method)
        assert status == code and "error" in answer, (path, answer)
    _check_results(good["results"], ensemble.soft_targets(one), 1, ensemble.class_names)


def test_concurrent_clients_share_batches(server, ensemble, images):
    names = ensemble.class_names
    temperatures = (1.0, 3.0)
    expected = {t: ensemble.soft_targets(images, temperature=t) for t in temperatures}
    _, before = server.request("/healthz")
    failures: list[str] = []

    def client(worker: int) -> None:
        rng = np.random.default_rng(worker)
        for i in range(4):
            ids = rng.choice(len(images), size=int(rng.integers(1, 6)), replace=False)
            t, k = temperatures[(worker + i) % 2], int(rng.integers(1, 10))
            try:
                if i % 2:
                    status, body = server.post_json({"inputs": images[ids].tolist(), "top_k": k, "temperature": t})
                else:
                    status, body = server.request(f"/v1/soft_targets/npy?top_k={k}&temperature={t}",
                                                  _npy(images[ids].numpy()))
                assert status == 200, body
                _check_results(body["results"], expected[t][ids], k, names)
            except Exception as exc:  # noqa: BLE001 - collected and reported below
                failures.append(f"client {worker} request {i}: {exc!r}")

    threads = [threading.Thread(target=client, args=(w,)) for w in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not failures, failures[:3]
    _, after = server.request("/healthz")
    requests = after["stats"]["requests"] - before["stats"]["requests"]
    batches = after["stats"]["batches"] - before["stats"]["batches"]
    assert requests == 64
    assert batches < requests and after["stats"]["max_batch_requests"] > 1, after["stats"]
    assert after["stats"]["max_batch_inputs"] <= 16


def test_sigint_stops_the_server_and_its_processes(server):
    family = descendants(server.proc.pid)
    assert family, "Ray should run as the server's child processes"
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(timeout=90) == 0, server.output()[-3000:]
    assert "stopped" in server.output()
    deadline = time.time() + 30
    while _alive(family) and time.time() < deadline:
        time.sleep(0.5)
    assert not _alive(family), f"left behind: {sorted(_alive(family))}"
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url + "/healthz", timeout=5)


def test_unknown_run_or_busy_port_fails_before_ray_starts(run_dir, tmp_path):
    script = (
        "import sys, ray\n"
        "from orchestration.cli import main\n"
        "codes = [main(['serve', sys.argv[1]]), main(['serve', sys.argv[2], '--port', sys.argv[3]]),\n"
        "         main(['serve', sys.argv[2], '--max-batch-size', '0'])]\n"
        "print('codes', codes, 'ray started:', ray.is_initialized())\n"
    )
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "no-such-run"), str(run_dir), str(port)],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path,
                              env=_private_ray_env())
    assert "codes [1, 2, 2] ray started: False" in done.stdout, done.stdout + done.stderr
    assert f"no run directory at {str(tmp_path / 'no-such-run')!r}" in done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "--port" in done.stderr
    assert "--max-batch-size must be an integer >= 1, got 0" in done.stderr


def test_leftovers_of_a_killed_server_are_stopped_by_the_next_start(run_dir, tmp_path):
    """kill -9 of the driver leaves Ray's dashboard and runtime-env agents running; the next
    private local Ray stops them (and only them: nothing of a live driver is touched)."""
    first = _start_server(run_dir, tmp_path / "first.log")
    family = descendants(first.proc.pid)
    first.proc.kill()
    first.proc.wait()
    second = _start_server(run_dir, tmp_path / "second.log")
    try:
        deadline = time.time() + 30
        while _alive(family) and time.time() < deadline:  # SIGKILLed ones may take a moment to go
            time.sleep(0.5)
        left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:60] for pid in _alive(family)}
        assert not left, f"left running by the killed server: {left}"
        status, _ = second.request("/healthz")
        assert status == 200
    finally:
        _stop(second)
