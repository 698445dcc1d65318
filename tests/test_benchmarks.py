"""The benchmarks' own machinery: the shaping proxy passes S3 traffic through unchanged, and the
fetch experiment's known-layout prefetch leaves BRAID's fetch nothing to request."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from braid import nsd, transfer
from braid.betas import read_session

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from betas_masking import ROI_VOXELS, SHAPE, roi_mask_zyx  # noqa: E402
from fetch_link import KnownLayout  # noqa: E402
from shaping_proxy import ShapingProxy  # noqa: E402
from test_nsd import public_bucket, roi_zyx  # noqa: E402


def test_the_shaping_proxy_passes_whole_and_ranged_fetches_through_unchanged(s3_server, mirror, tmp_path):
    import h5py

    root, _ = mirror
    key = nsd.betas_key(1, 1)
    public_bucket(s3_server, root, [key])
    proxy = ShapingProxy(s3_server, latency=0.005, bandwidth=50e6)
    try:
        s3 = {"endpoint_url": proxy.endpoint}
        transfer.fetch(f"s3://{nsd.BUCKET}", key, tmp_path / "whole.hdf5", **s3)
        assert (tmp_path / "whole.hdf5").read_bytes() == (root / key).read_bytes()
        before = proxy.requests
        mask = roi_zyx(root)
        entry = transfer.fetch_betas_roi(f"s3://{nsd.BUCKET}", key, tmp_path / "roi.hdf5", mask, **s3)
        # every GET of the fetch, and its HEAD, went through the proxy
        assert proxy.requests - before == entry["requests"] + 1
    finally:
        proxy.close()
    with h5py.File(root / key, "r") as f:
        expected = f["betas"][:][:, mask].astype(np.float32) / 300
    np.testing.assert_array_equal(read_session(tmp_path / "roi.hdf5", mask), expected)


def test_a_known_layout_is_prefetched_in_one_round_and_braid_requests_nothing_more(mirror, tmp_path):
    root, _ = mirror
    key = nsd.betas_key(1, 2)
    mask = roi_zyx(root)
    plain = transfer.fetch_betas_roi(str(root), key, tmp_path / "plain.hdf5", mask)
    known = KnownLayout()
    known.record(str(root), key, tmp_path / "recorded.hdf5", mask)
    assert known.needed and len(known.needed) == len(set(known.needed))
    # a gap wide enough to merge every range: the prefetch is one request, and BRAID's fetch adds none
    entry = known.fetch(10**6, str(root), key, tmp_path / "known.hdf5", mask)
    assert entry["requests"] == 1
    np.testing.assert_array_equal(read_session(tmp_path / "known.hdf5", mask), read_session(tmp_path / "plain.hdf5", mask))
    assert plain["requests"] > 1
    from braid import hdf5_ranges

    assert hdf5_ranges.RangeCache.__name__ == "RangeCache"  # BRAID's own class is back in place


def test_the_benchmark_roi_has_subj01s_nsdgeneral_size():
    mask = roi_mask_zyx()
    assert mask.shape == SHAPE[1:] and int(mask.sum()) == ROI_VOXELS == nsd.NSDGENERAL_VOXELS[1]


def test_braids_ridge_equals_himalayas_at_the_same_alpha(tmp_path):
    """benchmarks/ridge_himalaya.py's cross-check, small: BRAID's closed form and himalaya's Ridge (the
    field's library, an independent implementation) give the same predictions and weights at BRAID's alpha,
    and himalaya's own validation choice of one alpha is BRAID's."""
    import re
    import subprocess

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "ridge_himalaya.py"
    out = subprocess.run([sys.executable, str(script), "--samples", "300", "--voxels", "400", "--val", "60", "--test",
                          "60", "--targets", "40", "--methods", "braid,hm-fixed,hm-1a"], capture_output=True, text=True,
                         check=True).stdout
    check = re.search(r"test predictions max \|diff\| \S+ \(relative to max \|pred\| (\S+)\); weights max \|diff\| "
                      r"\S+ \(relative (\S+)\)", out)
    assert check and float(check.group(1)) < 1e-4 and float(check.group(2)) < 1e-4, out
    chosen = re.search(r"single alpha chosen: braid (\S+), himalaya hm-1a \(local_alpha=False\) (\S+)", out)
    assert chosen and float(chosen.group(1)) == float(chosen.group(2)), out
