"""Serve a finished run's ensemble over HTTP with Ray Serve (``specdistill serve RUN``).

Routes (all answers are JSON; docs/serve.md has examples with curl and Python):

    GET  /healthz                  status, run dir, classes, image shape, limits, batching stats
    GET  /v1/classes               the class names, in output order
    POST /v1/soft_targets          {"inputs": (N, C, H, W) nested list, "top_k": 5, "temperature": 1.0}
    POST /v1/soft_targets/npy      body = ``np.save`` bytes of an (N, C, H, W) array; ?top_k=&temperature=
    POST /v1/soft_targets/png      body = one image file (PNG; any format Pillow reads); ?top_k=&temperature=

Every soft-target route answers ``{"results": [{"top_k": [{"class": name, "probability": p},
...]}, ...]}``, one result per input, most probable class first; ``probability`` is the
ensemble's combined distribution softened to ``temperature``, ``softmax(log q / T)``.

Batching happens across requests: each request's images go to one ``@serve.batch`` queue per
replica, which concatenates the images of the requests waiting (up to ``max_batch_size``
images, or whatever arrived within ``batch_wait_ms``), computes ``q`` once at ``T = 1``, and
hands each request its rows back; each request then softens and takes its top-k itself. A
request with more images than ``max_batch_size`` is split into chunks that queue separately.

Bad requests get a 4xx with ``{"error": message}`` (what is wrong and what is expected) and
the replica keeps serving: 400 body that is not JSON / not an ``.npy`` file / not an image,
404 unknown route, 405 wrong method, 413 payload over ``max_payload_mb`` or more than
``max_inputs`` images, 422 wrong shape, dtype, value range, ``top_k`` or ``temperature``.

Parsing, validation and the answers are :mod:`orchestration.serve_protocol` (plain functions
that raise ``RequestError``, testable without a server). :func:`build_app` makes the Serve
application; :func:`start` connects Ray (``orchestration.parallel.connect``: a private local
Ray unless an address is given), starts Serve's HTTP proxy on ``host:port`` and deploys the
application; :meth:`RunningServer.stop` takes it down again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayTaskError
from starlette.exceptions import HTTPException as StarletteHTTPException
from torch import Tensor

from orchestration.ensemble_api import Ensemble
from orchestration.parallel import connect
from orchestration.serve_protocol import (
    Query,
    RequestError,
    is_finite_number,
    parse_image_request,
    parse_json_request,
    parse_npy_request,
    top_k_results,
)

APP_NAME = "specdistill"


class ServeError(RuntimeError):
    """The server cannot start as asked (the message names the problem and the fix)."""


@dataclass(frozen=True)
class ServeOptions:
    """Request limits, batching and replicas (the ``specdistill serve`` options)."""

    max_batch_size: int = 64        # images computed together, across requests
    batch_wait_ms: float = 5.0      # how long a batch waits for more requests once one arrived
    max_inputs: int = 256           # images per request
    max_payload_mb: float = 16.0    # request body size (MiB)
    replicas: int = 1
    replica_cpus: float = 1.0       # CPUs each replica reserves (= its torch threads, at least 1)

    def __post_init__(self) -> None:
        def count(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= 1

        checks = {
            "--max-batch-size must be an integer >= 1": count(self.max_batch_size),
            "--batch-wait-ms must be a number >= 0": is_finite_number(self.batch_wait_ms) and self.batch_wait_ms >= 0,
            "--max-inputs must be an integer >= 1": count(self.max_inputs),
            "--max-payload-mb must be a number > 0": is_finite_number(self.max_payload_mb) and self.max_payload_mb > 0,
            "--replicas must be an integer >= 1": count(self.replicas),
            "--replica-cpus must be a number > 0 (fractions like 0.5 share a core)":
                is_finite_number(self.replica_cpus) and self.replica_cpus > 0,
        }
        problems = [f"{rule}, got {value!r}"
                    for (rule, ok), value in zip(checks.items(), asdict(self).values(), strict=True) if not ok]
        if problems:
            raise ServeError("; ".join(problems))

    @property
    def max_payload_bytes(self) -> int:
        return int(self.max_payload_mb * 1024 * 1024)

    @property
    def max_ongoing_requests(self) -> int:
        """Requests a replica takes at once: enough to fill a batch with one-image requests."""
        return max(2 * self.max_batch_size, 16)


# ---------------------------------------------------------------------------------------------
# The Serve deployment
# ---------------------------------------------------------------------------------------------

api = FastAPI(title="specdistill ensemble", docs_url=None, redoc_url=None, openapi_url=None)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@api.exception_handler(RequestError)
async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    return _error(exc.status, exc.message)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    if exc.status_code == 404:
        message = (f"no route {request.url.path}; routes: GET /healthz, GET /v1/classes, POST "
                   "/v1/soft_targets, POST /v1/soft_targets/npy, POST /v1/soft_targets/png")
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}; see docs/serve.md"
    else:
        message = str(exc.detail)
    return JSONResponse({"error": message}, status_code=exc.status_code, headers=exc.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _error(422, f"invalid request: {exc.errors()}")


def _count_images(chunks: list[Tensor]) -> int:
    return sum(len(c) for c in chunks)


class EnsembleServer:
    """One replica: the run's ensemble, the routes, and the cross-request batch queue."""

    def __init__(self, run_dir: str, options: ServeOptions, loopback: bool = False) -> None:
        if loopback:
            replica_grpc_on_loopback()
        self.run_dir = run_dir
        self.options = options
        self.ensemble = Ensemble.load(run_dir)
        self.class_names = self.ensemble.class_names
        self.image_shape = tuple(self.ensemble.image_shape)
        self.stats = {"requests": 0, "inputs": 0, "batches": 0, "max_batch_requests": 0,
                      "max_batch_inputs": 0}
        self._batched_q.set_max_batch_size(options.max_batch_size)
        self._batched_q.set_batch_wait_timeout_s(options.batch_wait_ms / 1000)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "run_dir": self.run_dir, "num_classes": len(self.class_names),
                "image_shape": list(self.image_shape), "limits": asdict(self.options),
                "stats": dict(self.stats)}

    @api.get("/v1/classes")
    async def classes(self) -> dict[str, Any]:
        return {"classes": self.class_names}

    @api.post("/v1/soft_targets")
    async def soft_targets_json(self, request: Request) -> dict[str, Any]:
        body = await self._read_body(request)
        if request.query_params:
            raise RequestError(422, "this route takes its options in the JSON body "
                                    '({"inputs": ..., "top_k": 5, "temperature": 1.0}), not the query string')
        return await self._answer(parse_json_request, body, self.image_shape, len(self.class_names),
                                  self.options.max_inputs)

    @api.post("/v1/soft_targets/npy")
    async def soft_targets_npy(self, request: Request) -> dict[str, Any]:
        body = await self._read_body(request)
        return await self._answer(parse_npy_request, body, dict(request.query_params), self.image_shape,
                                  len(self.class_names), self.options.max_inputs)

    @api.post("/v1/soft_targets/png")
    async def soft_targets_png(self, request: Request) -> dict[str, Any]:
        body = await self._read_body(request)
        return await self._answer(parse_image_request, body, dict(request.query_params), self.image_shape,
                                  len(self.class_names))

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused with 413 as soon as it is known to be over the limit."""
        limit = self.options.max_payload_bytes
        too_big = (f"request body over the {self.options.max_payload_mb:g} MiB limit "
                   f"(--max-payload-mb); send fewer images per request")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestError(413, too_big)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestError(413, too_big)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _answer(self, parse: Callable[..., Query], *args: Any) -> dict[str, Any]:
        """Parse the request (in a thread: a large JSON body takes a while), then batch it."""
        query = await asyncio.to_thread(parse, *args)
        step = self.options.max_batch_size
        parts = await asyncio.gather(*(self._batched_q(query.images[i:i + step])
                                       for i in range(0, len(query.images), step)))
        self.stats["requests"] += 1
        self.stats["inputs"] += len(query.images)
        return top_k_results(torch.cat(parts), query.top_k, query.temperature, self.class_names)

    @serve.batch(max_batch_size=ServeOptions.max_batch_size, batch_size_fn=_count_images)  # set in __init__
    async def _batched_q(self, chunks: list[Tensor]) -> list[Tensor]:
        """``q`` at ``T = 1`` for the images of every request in the batch, computed at once."""
        x = torch.cat(chunks)
        q = await asyncio.to_thread(self.ensemble.soft_targets, x)
        self.stats["batches"] += 1
        self.stats["max_batch_requests"] = max(self.stats["max_batch_requests"], len(chunks))
        self.stats["max_batch_inputs"] = max(self.stats["max_batch_inputs"], len(x))
        return list(q.split([len(c) for c in chunks]))


# Serve subclasses the ingress class and ships that subclass to the replicas by value; keeping
# EnsembleServer itself importable (orchestration.serve.EnsembleServer) makes its methods travel
# by reference, so the replicas resolve their annotations (strings, under `from __future__ import
# annotations`) in this module; FastAPI would otherwise take `request: Request` for a query field.
ensemble_deployment = serve.deployment(name="EnsembleServer")(serve.ingress(api)(EnsembleServer))


def replica_grpc_on_loopback() -> None:
    """In a replica's process: the inter-deployment gRPC server Serve starts once the replica is
    constructed binds 127.0.0.1 instead of every interface. Ray Serve 2.60 hard-codes "[::]:0" for
    it (``ray/serve/_private/replica.py``) with no option; on the private local Ray, where every
    other component listens on 127.0.0.1 (:mod:`orchestration.local_ray`), peers reach it there.
    A Serve without that hook is left as it is."""
    from ray.serve._private import replica

    bind = getattr(replica, "add_port_to_grpc_server", None)
    if bind is None or getattr(bind, "on_loopback", False):
        return

    def on_loopback(server: Any, address: str) -> int:
        return bind(server, "127.0.0.1:0" if address == "[::]:0" else address)

    on_loopback.on_loopback = True
    replica.add_port_to_grpc_server = on_loopback


def build_app(run_dir: str | Path, options: ServeOptions | None = None, *,
              loopback: bool = False) -> serve.Application:
    """The Serve application answering for run directory ``run_dir`` (not deployed yet);
    ``loopback``: its replicas' internal gRPC server on 127.0.0.1 (the private local Ray)."""
    options = options or ServeOptions()
    return ensemble_deployment.options(
        num_replicas=options.replicas,
        max_ongoing_requests=options.max_ongoing_requests,
        graceful_shutdown_wait_loop_s=0.5,   # on stop: let in-flight requests finish, then go
        ray_actor_options={"num_cpus": options.replica_cpus},
    ).bind(str(Path(run_dir).resolve()), options, loopback)


# ---------------------------------------------------------------------------------------------
# Starting and stopping
# ---------------------------------------------------------------------------------------------

@dataclass
class RunningServer:
    """A deployed application; :meth:`stop` deletes it (and Serve + Ray when it started them)."""

    url: str
    run_dir: Path
    image_shape: tuple[int, int, int]
    class_names: list[str]
    ray: str             # where Ray runs, in words
    owns_ray: bool       # a private local Ray started for this server
    stopped: bool = False

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        if self.owns_ray:
            serve.shutdown()
            ray.shutdown()
        else:  # someone else's cluster: remove only this application
            with contextlib.suppress(Exception):  # not deployed (yet): nothing to remove
                serve.delete(APP_NAME)


def check_port_free(host: str, port: int) -> int:
    """``port`` (for 0: a port free now) when ``host:port`` can be bound here, else ServeError (in
    use, or not a local address)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.bind((host, port))
            return sock.getsockname()[1]
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); the port is in "
                         f"use or the host is not an address of this machine: pass another "
                         f"--port (or --host)") from None


PORT_ATTEMPTS = 5


def _start_proxy(host: str, port: int, owns_ray: bool) -> int:
    """Start Serve with its HTTP proxy on ``host:port``; returns the port it listens on. Port 0
    (private local Ray only) takes a free port, and another one when something else took it
    before the proxy bound it."""
    if port == 0 and not owns_ray:
        raise ServeError("--port 0 (a free port) needs the private local Ray; on a cluster "
                         "(--address or RAY_ADDRESS) pass the port to listen on")
    for _ in range(PORT_ATTEMPTS if port == 0 else 1):
        chosen = check_port_free(host, port) if port == 0 else port
        try:
            serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": chosen})
            return chosen
        except RayTaskError as exc:
            if "Failed to bind" not in str(exc):
                raise
            if port != 0:
                raise ServeError(f"cannot listen on {host}:{port}: the port was taken just before the "
                                 f"server bound it; pass another --port (or --port 0)") from None
            serve.shutdown()
    raise ServeError(f"the free ports picked on {host} were taken {PORT_ATTEMPTS} times in a row before "
                     "the server bound them; pass a --port")


def start(run_dir: str | Path, options: ServeOptions | None = None, *, host: str = "127.0.0.1",
          port: int = 8000, address: str | None = None, ready_timeout_s: float = 120.0) -> RunningServer:
    """Deploy the ensemble of ``run_dir`` on Ray Serve at ``http://host:port``; returns once it answers.
    ``port=0`` listens on a free port (retried when it is taken before the proxy binds it); the
    returned server's ``url`` names the port bound.

    The ensemble is loaded here first, so a broken run directory fails before Ray starts. With
    no ``address`` (and no ``RAY_ADDRESS``) a private local Ray is started and shut down by
    :meth:`RunningServer.stop`; with one, the application is deployed on that cluster (whose
    nodes must see ``run_dir``) and ``stop`` removes only the application.
    """
    options = options or ServeOptions()
    run_path = Path(run_dir).resolve()
    ensemble = Ensemble.load(run_path)  # FileNotFoundError / checks with the fix, before Ray
    image_shape, class_names = tuple(ensemble.image_shape), list(ensemble.class_names)
    del ensemble
    owns_ray = not address and not os.environ.get("RAY_ADDRESS") and not ray.is_initialized()
    if owns_ray and port != 0:
        check_port_free(host, port)
    where = connect(address)
    server = RunningServer(_url(host, port), run_path, image_shape, class_names, where, owns_ray)
    try:
        if owns_ray:
            needed = options.replicas * options.replica_cpus
            have = ray.cluster_resources().get("CPU", 0.0)
            if needed > have:
                raise ServeError(
                    f"{options.replicas} replica(s) x {options.replica_cpus:g} CPU need {needed:g} "
                    f"CPUs but the local Ray has {have:g}; lower --replicas or --replica-cpus "
                    f"(fractions like 0.5 share a core)")
        server.url = _url(host, _start_proxy(host, port, owns_ray))
        serve.run(build_app(run_path, options, loopback=owns_ray), name=APP_NAME, route_prefix="/")
        if owns_ray:
            _wait_ready(server.url + "/healthz", ready_timeout_s)
    except BaseException:
        server.stop()
        raise
    return server


def _url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "") else ("::1" if host == "::" else host)
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def _wait_ready(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (OSError, urllib.error.HTTPError):
            pass
        if time.monotonic() > deadline:
            raise ServeError(f"the application was deployed but {url} did not answer within "
                             f"{timeout_s:g} s; check the Ray Serve logs under /tmp/ray/session_latest/logs/serve")
        time.sleep(0.25)


def example_commands(url: str, image_shape: tuple[int, int, int]) -> list[str]:
    """Example commands for the startup banner (one all-black image as .npy, a PNG file)."""
    shape = ", ".join(map(str, (1, *image_shape)))
    return [
        f"curl {url}/healthz",
        f'python -c "import numpy as np, sys; np.save(sys.stdout.buffer, np.zeros(({shape}), np.uint8))" '
        f"| curl -s --data-binary @- '{url}/v1/soft_targets/npy?top_k=3'",
        f"curl -s --data-binary @IMAGE.png '{url}/v1/soft_targets/png?top_k=3'",
    ]
