"""Shared fixtures: a tiny SSD-1B-shaped model and a small synthetic NSD mirror, built once per run."""

from __future__ import annotations

import copy
import socket

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
