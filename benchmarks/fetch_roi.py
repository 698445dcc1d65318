"""Benchmark: fetching one NSD-sized betas session from S3, ROI-only vs the whole object.

    npm install s3rver@3 && npx s3rver --directory /tmp/s3 --address 127.0.0.1 --port 4599 &
    .venv/bin/python benchmarks/fetch_roi.py --endpoint http://127.0.0.1:4599 [--workdir DIR]

Without --endpoint it starts moto's server, which is correct but re-reads the whole object for
every ranged GET (about 0.5 s per request on a 1.1 GB object), so a run takes ~20 minutes;
s3rver (an S3 server on the filesystem, from npm) serves ranges directly.

Serves a synthetic session of real size — (750, 83, 104, 81) int16, chunks (750, 1, 1, 1),
as subj01's betas_sessionNN.hdf5 — from a real S3 server (moto) on loopback, anonymously, and
fetches it twice: whole (ranged parallel parts, the baseline) and ROI-only for a 15,724-voxel
ROI (subj01's nsdgeneral count). Prints bytes transferred (metadata and data separately),
requests, wall time, and the ratios to the whole file and to the ideal (voxels x 750 x 2 bytes),
and checks that both give bit-identical ROI values. Loopback has no latency, so the wall
times say little about a real network; the byte counts are what carry over.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from betas_masking import make_session, roi_mask_zyx  # noqa: E402

from braid import nsd, transfer  # noqa: E402
from braid.betas import read_session  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--endpoint", default=None, help="a running S3 server on loopback (default: start moto)")
    args = ap.parse_args()

    import boto3

    server = None
    endpoint = args.endpoint
    if endpoint is None:
        from moto.server import ThreadedMotoServer

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        endpoint = f"http://127.0.0.1:{server._server.server_port}"
    key = nsd.betas_key(1, 1)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        local = tmp / "source.hdf5"
        make_session(local)
        admin = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-2",
                             aws_access_key_id="S3RVER", aws_secret_access_key="S3RVER")
        if nsd.BUCKET not in [b["Name"] for b in admin.list_buckets()["Buckets"]]:
            admin.create_bucket(Bucket=nsd.BUCKET, CreateBucketConfiguration={"LocationConstraint": "us-east-2"})
        admin.upload_file(str(local), nsd.BUCKET, key, ExtraArgs={"ACL": "public-read"})
        size = local.stat().st_size
        mask = roi_mask_zyx()
        ideal = int(mask.sum()) * 750 * 2
        print(f"object {size / 1e9:.3f} GB on loopback S3; ROI {mask.sum()} voxels, ideal {ideal / 1e6:.1f} MB")

        t = time.perf_counter()
        transfer.fetch(f"s3://{nsd.BUCKET}", key, tmp / "whole.hdf5", endpoint_url=endpoint)
        whole_s = time.perf_counter() - t
        t = time.perf_counter()
        entry = transfer.fetch_betas_roi(f"s3://{nsd.BUCKET}", key, tmp / "roi.hdf5", mask, endpoint_url=endpoint)
        roi_s = time.perf_counter() - t

        same = np.array_equal(read_session(tmp / "roi.hdf5", mask), read_session(tmp / "whole.hdf5", mask))
        total = entry["bytes_metadata"] + entry["bytes_data"]
        print(f"whole     {size / 1e6:9.1f} MB  {whole_s:6.1f} s   (baseline)")
        print(f"roi-only  {total / 1e6:9.1f} MB  {roi_s:6.1f} s   metadata {entry['bytes_metadata'] / 1e6:.2f} MB, "
              f"data {entry['bytes_data'] / 1e6:.2f} MB in {entry['requests']} requests; stored {entry['bytes_stored'] / 1e6:.1f} MB")
        print(f"roi-only / whole bytes = {total / size:.4f}  (goal <= 0.1)")
        print(f"data / ideal           = {entry['bytes_data'] / ideal:.3f}  (goal <= 1.1)")
        print(f"whole / roi-only time  = {whole_s / roi_s:.1f}x")
        print(f"ROI values bit-identical to whole-file-then-mask: {same}")
    if server is not None:
        server.stop()


if __name__ == "__main__":
    from braid.common import exit_on_sigterm

    exit_on_sigterm()  # a killed run removes its temporary folder
    main()
