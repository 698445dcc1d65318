"""Benchmark: ROI-only vs whole-object fetching of one real-size betas session over simulated links.

    .venv/bin/python benchmarks/fetch_link.py [--s3rver PATH] [--workdir DIR] [--grid] [--address-map]

(s3rver, from npm, is installed under /tmp/s3rver on first use unless it is on PATH.)

A shaping proxy (benchmarks/shaping_proxy.py: latency added to every request, one shared
bandwidth for all response bodies) sits between BRAID and an S3 server on loopback (s3rver,
which serves byte ranges from disk; moto re-reads the whole object for every ranged GET). The
object is a synthetic session of subj01's real size, (750, 83, 104, 81) int16 in NSD's
(750, 1, 1, 1) chunks, and the ROI has 15,724 voxels (subj01's nsdgeneral count). For each link
it times the whole-object fetch (the baseline: BRAID's ranged parallel parts, transfer.fetch) and the
ROI-only fetch (transfer.fetch_betas_roi) with BRAID's settings, then the ROI-only fetch over a grid
of concurrency x merge gap, and prints wall-time ratios whole / ROI-only (goal >= 5 on both
links). ``--address-map`` adds an experiment BRAID does not do (:class:`KnownLayout`: every
range known beforehand and prefetched in one round). It also measures the proxy's own ceiling
without shaping: on a slow machine the proxy, not the simulated link, may limit the
whole-object fetch, which flatters ROI-only.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from betas_masking import SHAPE, make_session, roi_mask_zyx  # noqa: E402
from shaping_proxy import ShapingProxy  # noqa: E402

from braid import nsd, transfer  # noqa: E402
from braid.betas import read_session  # noqa: E402
from braid.rehearsal import s3rver_binary, start_s3rver  # noqa: E402

LINKS = [("20 ms, 100 MB/s", 0.020, 100e6), ("60 ms, 1 GB/s", 0.060, 1e9)]


def timed(fn, *args, **kw):
    t = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t, out


class KnownLayout:
    """The ROI fetch as it would run if the file's layout were known beforehand (an experiment).

    :meth:`record` runs BRAID's fetch once and notes every range it looks up (file head, chunk
    B-tree nodes, wanted chunks). :meth:`fetch` then reads them all in one round of parallel
    requests (ranges closer than ``gap_chunks`` chunks merged) before BRAID's own fetch runs, which
    finds everything in its cache. This bounds what a per-file address map, kept from an earlier
    session of the same layout, could gain.
    """

    def __init__(self):
        self.needed: list[tuple[int, int]] = []

    def _patched(self, prefetch: list[tuple[int, int]], gap_bytes: int):
        from braid import hdf5_ranges

        needed = self.needed

        class Recorded(hdf5_ranges.RangeCache):
            def __init__(self, reader, parallel=16):
                super().__init__(reader, parallel)
                if prefetch:
                    super().read_many(prefetch, gap_bytes)

            def cached(self, offset, size):
                needed.append((offset, size))
                return super().cached(offset, size)

        return Recorded

    def _run(self, prefetch, gap_bytes, *args, **kw) -> dict:
        from braid import hdf5_ranges

        plain = hdf5_ranges.RangeCache
        hdf5_ranges.RangeCache = self._patched(prefetch, gap_bytes)
        try:
            return transfer.fetch_betas_roi(*args, **kw)
        finally:
            hdf5_ranges.RangeCache = plain

    def record(self, *args, **kw) -> None:
        self._run([], 0, *args, **kw)
        self.needed[:] = sorted(set(self.needed))

    def fetch(self, gap_chunks: int, *args, **kw) -> dict:
        return self._run(list(self.needed), gap_chunks * SHAPE[0] * 2, *args, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--s3rver", type=Path, default=None,
                    help="s3rver's command (default: on PATH, else installed by npm under /tmp/s3rver)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--grid", action="store_true", help="also sweep concurrency x merge gap")
    ap.add_argument("--parallel", type=int, nargs="+", default=[16, 32, 64, 128], help="concurrencies of the sweep")
    ap.add_argument("--gaps", type=int, nargs="+", default=[0, 4, 16, 64, 128, 256, 512],
                    help="merge gaps of the sweep, in chunks")
    ap.add_argument("--address-map", action="store_true",
                    help="also time an experiment BRAID does not do: the ROI fetch with every range it needs known "
                         "from the fetch before, prefetched in one round (see address_map_fetch)")
    args = ap.parse_args()
    import boto3

    key = nsd.betas_key(1, 1)
    mask = roi_mask_zyx()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        (tmp / "s3").mkdir()
        binary = args.s3rver or (Path(shutil.which("s3rver")) if shutil.which("s3rver") else s3rver_binary(Path("/tmp/s3rver")))
        server, upstream = start_s3rver(binary, tmp / "s3")
        try:
            local = tmp / "source.hdf5"
            make_session(local)
            admin = boto3.client("s3", endpoint_url=upstream, region_name="us-east-2",
                                 aws_access_key_id="S3RVER", aws_secret_access_key="S3RVER")
            admin.create_bucket(Bucket=nsd.BUCKET)
            admin.upload_file(str(local), nsd.BUCKET, key, ExtraArgs={"ACL": "public-read"})
            local.unlink()
            size = admin.head_object(Bucket=nsd.BUCKET, Key=key)["ContentLength"]
            print(f"object {size / 1e9:.3f} GB; ROI {int(mask.sum())} voxels; "
                  f"BRAID: {transfer.RANGE_PARALLEL} parallel ranges, merge gap {transfer.GAP_CHUNKS} chunks, "
                  f"whole object in {transfer.PART_SIZE >> 20} MB parts x {transfer.PART_PARALLEL}")

            proxy = ShapingProxy(upstream)
            ceiling_s, _ = timed(transfer.fetch, f"s3://{nsd.BUCKET}", key, tmp / "w.hdf5", endpoint_url=proxy.endpoint)
            proxy.close()
            (tmp / "w.hdf5").unlink()
            print(f"proxy ceiling, no shaping: whole object {ceiling_s:.2f} s = {size / ceiling_s / 1e6:.0f} MB/s")

            results = []
            for name, latency, bandwidth in LINKS:
                proxy = ShapingProxy(upstream, latency, bandwidth)
                s3 = {"endpoint_url": proxy.endpoint}
                whole_s, _ = timed(transfer.fetch, f"s3://{nsd.BUCKET}", key, tmp / "whole.hdf5", **s3)
                proxy.requests = 0
                roi_s, entry = timed(transfer.fetch_betas_roi, f"s3://{nsd.BUCKET}", key, tmp / "roi.hdf5", mask, **s3)
                same = np.array_equal(read_session(tmp / "roi.hdf5", mask), read_session(tmp / "whole.hdf5", mask))
                ratio = whole_s / roi_s
                results.append((name, ratio))
                print(f"\n{name}: whole {whole_s:6.2f} s (baseline) | ROI-only {roi_s:5.2f} s, "
                      f"{entry['requests']} requests, {(entry['bytes_metadata'] + entry['bytes_data']) / 1e6:.1f} MB "
                      f"| whole / ROI-only = {ratio:.1f}x (goal >= 5) | ROI values identical: {same}")
                (tmp / "roi.hdf5").unlink()
                if args.address_map:
                    known = KnownLayout()
                    known.record(f"s3://{nsd.BUCKET}", key, tmp / "roi.hdf5", mask, **s3)
                    (tmp / "roi.hdf5").unlink()
                    for gap in (32, 64, 128):
                        t, e = timed(known.fetch, gap, f"s3://{nsd.BUCKET}", key, tmp / "roi.hdf5", mask, **s3)
                        (tmp / "roi.hdf5").unlink()
                        print(f"   address map known, prefetch gap {gap:3d} chunks: {t:5.2f} s, {e['requests']:5d} "
                              f"requests, {(e['bytes_metadata'] + e['bytes_data']) / 1e6:6.1f} MB, "
                              f"whole / ROI = {whole_s / t:5.1f}x")
                if args.grid:
                    saved = transfer.RANGE_PARALLEL
                    for parallel in args.parallel:
                        transfer.RANGE_PARALLEL = parallel
                        for gap in args.gaps:
                            t, e = timed(transfer.fetch_betas_roi, f"s3://{nsd.BUCKET}", key, tmp / "roi.hdf5", mask,
                                         gap_chunks=gap, **s3)
                            (tmp / "roi.hdf5").unlink()
                            print(f"   parallel {parallel:3d} gap {gap:3d}: {t:5.2f} s, {e['requests']:5d} requests, "
                                  f"{(e['bytes_metadata'] + e['bytes_data']) / 1e6:6.1f} MB, whole / ROI = {whole_s / t:5.1f}x")
                    transfer.RANGE_PARALLEL = saved
                (tmp / "whole.hdf5").unlink()
                proxy.close()
            print("\nsummary (whole-object wall time / ROI-only wall time):")
            for name, ratio in results:
                print(f"  {name:18s} {ratio:5.1f}x  {'met' if ratio >= 5 else 'NOT met'} (goal >= 5)")
        finally:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    from braid.common import exit_on_sigterm

    exit_on_sigterm()  # a killed run removes its 2 GB temporary folder and stops s3rver
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
    main()
