"""A shaping reverse proxy on loopback: a simulated network link in front of an S3 server.

Every request waits ``latency`` seconds before it is forwarded (one round trip of a real link,
on a kept-alive connection), and response bodies share one ``bandwidth`` (bytes per second, a
token bucket over all connections), as the clients of one machine share its link. Used by
``benchmarks/fetch_link.py``; ``python benchmarks/shaping_proxy.py UPSTREAM`` runs one by hand.
"""

from __future__ import annotations

import http.client
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

BLOCK = 256 * 1024


class Pacer:
    """Virtual-time pacing: each block is sent when the link has carried the ones before it."""

    def __init__(self, bandwidth: float | None):
        self.bandwidth = bandwidth
        self._next = 0.0
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        if not self.bandwidth:
            return
        with self._lock:
            now = time.monotonic()
            self._next = max(self._next, now) + n / self.bandwidth
            done = self._next
        wait = done - time.monotonic()
        if wait > 0:
            time.sleep(wait)


class ShapingProxy:
    def __init__(self, upstream: str, latency: float = 0.0, bandwidth: float | None = None):
        up = urlparse(upstream)
        self.latency, self.pacer = latency, Pacer(bandwidth)
        self.requests = 0
        proxy = self
        local = threading.local()
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients use

            def log_message(self, *args):
                pass

            def _upstream(self) -> http.client.HTTPConnection:
                if getattr(local, "conn", None) is None:
                    local.conn = http.client.HTTPConnection(up.hostname, up.port, timeout=120)
                return local.conn

            def _forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                with lock:
                    proxy.requests += 1
                if proxy.latency:
                    time.sleep(proxy.latency)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                for attempt in (1, 2):
                    conn = self._upstream()
                    try:
                        conn.request(self.command, self.path, body, headers)
                        resp = conn.getresponse()
                        break
                    except (ConnectionError, http.client.HTTPException):
                        conn.close()
                        local.conn = None
                        if attempt == 2:
                            raise
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "server", "date"):
                        self.send_header(k, v)
                if resp.getheader("Content-Length") is None:
                    data = resp.read()
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                self.end_headers()
                if self.command == "HEAD":
                    resp.read()
                    return
                while True:
                    block = resp.read(BLOCK)
                    if not block:
                        break
                    proxy.pacer.take(len(block))
                    self.wfile.write(block)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

        self.server = Server(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("upstream")
    ap.add_argument("--latency-ms", type=float, default=20)
    ap.add_argument("--mb-per-s", type=float, default=100)
    a = ap.parse_args()
    p = ShapingProxy(a.upstream, a.latency_ms / 1000, a.mb_per_s * 1e6)
    print(p.endpoint, flush=True)
    threading.Event().wait()
