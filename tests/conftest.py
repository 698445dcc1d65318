"""Shared fixtures: a tiny SSD-1B-shaped model and a small synthetic NSD mirror, built once per run."""

from __future__ import annotations

import copy
import os
import shutil
import socket
import subprocess

import pytest

SMALL_SYNTHETIC = {
    "seed": 3,
    "subjects": [1, 2],
    "sessions": 2,
    "trials_per_session": 60,
    "images_per_subject": 40,
    "shared_images": 8,
    "extra_images": 2,
    "volume": [12, 14, 10],
    "roi_fraction": 0.2,
    "gain": 2.0,
    "noise_sd": 0.5,
    "nonlinearity": "none",
    "prior_images": 300,
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from braid.models import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("model") / "tiny", seed=0)


@pytest.fixture(scope="session")
def synthetic_cfg():
    return copy.deepcopy(SMALL_SYNTHETIC)


@pytest.fixture(scope="session")
def mirror(tmp_path_factory, tiny_model, synthetic_cfg):
    """A synthetic NSD mirror (bucket keys under the returned folder) and its metadata."""
    from braid.synthetic import generate

    root = tmp_path_factory.mktemp("nsd")
    meta = generate(synthetic_cfg, tiny_model, root, image_size=64)
    return root, meta


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def s3_server(monkeypatch):
    """A real S3 server (moto) on loopback; yields its endpoint URL. No request leaves the machine."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    endpoint = f"http://127.0.0.1:{port}"
    try:
        yield endpoint
    finally:
        # moto keeps its state in-process: reset it so that every test starts with no buckets
        import urllib.request

        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", method="POST")).read()
        server.stop()


class FaultProxy:
    """An HTTP proxy on loopback in front of the S3 server that breaks GET responses on purpose.

    ``rate``: the fraction of GETs that fail, evenly as a 500, a connection reset, or a body
    cut short after the headers promised more. ``down``: every GET is reset (a dead network);
    ``fail_after``: the network dies after that many GETs. ``flips``: GET number (1-based) ->
    (byte offset, bit mask) to flip in that response's body, its length kept (bytes altered on the
    way). ``status``: every GET is answered with this status (503: an overloaded endpoint).
    """

    def __init__(self, upstream: str, rate: float = 0.0, seed: int = 0):
        import http.client
        import random
        import socket
        import threading
        import time
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from urllib.parse import urlparse

        up = urlparse(upstream)
        proxy = self
        self.rate, self.down, self.gets, self.faults = rate, False, 0, 0
        self.fail_after: int | None = None  # GETs after which the network dies
        self.delay = 0.0  # seconds added to every GET (a slow link)
        self.flips: dict[int, tuple[int, int]] = {}
        self.status: int | None = None
        self._rng, self._lock = random.Random(seed), threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                if self.command == "GET" and proxy.delay:
                    time.sleep(proxy.delay)
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                conn.request(self.command, self.path, body, {k: v for k, v in self.headers.items()})
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                fault = None
                if self.command == "GET":
                    with proxy._lock:
                        proxy.gets += 1
                        flip = proxy.flips.pop(proxy.gets, None)
                        if flip and data:
                            altered = bytearray(data)
                            altered[min(flip[0], len(data) - 1)] ^= flip[1]
                            data = bytes(altered)
                        if proxy.status:
                            fault = str(proxy.status)
                        r = proxy._rng.random()
                        if proxy.fail_after is not None and proxy.gets > proxy.fail_after:
                            proxy.down = True
                        if proxy.down:
                            fault = "reset"
                        elif r < proxy.rate:
                            fault = ("500", "reset", "truncate")[int(3 * r / proxy.rate)]
                        proxy.faults += fault is not None
                if fault == "reset":
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault in ("500", "503"):
                    code = b"InternalError" if fault == "500" else b"SlowDown"
                    err = b"<Error><Code>" + code + b"</Code><Message>injected</Message></Error>"
                    self.send_response(int(fault))
                    self.send_header("Content-Length", str(len(err)))
                    self.end_headers()
                    self.wfile.write(err)
                    return
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", resp.getheader("Content-Length") if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if fault == "truncate":
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def fault_proxy(s3_server):
    proxy = FaultProxy(s3_server)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture()
def slurm_cluster():
    """A SLURM cluster answering on this machine (.ci/slurm_up.sh starts one). Where none runs the
    test is skipped, except in CI (BRAID_REQUIRE_SLURM=1, set by .ci/run), where it fails with why."""
    why = None
    if not shutil.which("sinfo"):
        why = "no sinfo on PATH"
    else:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
        if proc.returncode != 0 or not proc.stdout.strip():
            why = f"sinfo failed: {proc.stderr.strip() or 'no nodes'}"
    if why is None:
        return
    if os.environ.get("BRAID_REQUIRE_SLURM") == "1":
        pytest.fail(f"SLURM is required here (BRAID_REQUIRE_SLURM=1) but not usable: {why}; "
                    "run .ci/slurm_up.sh as root and see /var/log/slurm/")
    pytest.skip(f"no SLURM here ({why}); .ci/slurm_up.sh (as root) sets one up")


@pytest.fixture()
def failing_compiler(monkeypatch, tmp_path):
    """torch.compile as in an image without a working C compiler: inductor's $CXX fails, and its
    caches start empty (a kernel cached by an earlier compilation would need no compiler)."""
    import torch
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("CXX", "/bin/false")  # read when inductor's config is imported: patched there too
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor-cache"))
    torch._dynamo.reset()
    with inductor_config.patch({"cpp.cxx": (None, "/bin/false"), "fx_graph_cache": False}):
        yield
    torch._dynamo.reset()
