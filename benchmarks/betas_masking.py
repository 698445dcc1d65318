"""Benchmark: masking one NSD-sized betas session, BRAID vs the published pipelines' approach.

    .venv/bin/python benchmarks/betas_masking.py [--workdir DIR] [--repeats 3]

Writes a synthetic session of real size — (750, 83, 104, 81) int16, chunks (750, 1, 1, 1),
uncompressed, as NSD's betas_sessionNN.hdf5 for subj01 — and an ROI of 15,724 voxels
(subj01's nsdgeneral count), then times, each in a fresh process with the file in the page
cache (one untimed read first):

  peers         f["betas"][:] then [:, roi.T > 0] / 300 (Brain-Score, Takagi, ...)      <- baseline
  braid         braid.betas.read_session (direct reads of the ROI voxels' chunks)
  chunk-bytes   the ROI chunks' bytes through HDF5 direct chunk reads, nothing else
  pread-floor   the same bytes by os.pread of coalesced byte ranges, offsets known beforehand

and prints wall time, peak RSS and the ratios. Timings depend on the machine; the ratios are
what to compare.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPE = (750, 83, 104, 81)  # (trials, Z, Y, X) through h5py, subj01 at 1.8 mm
ROI_VOXELS = 15_724


def roi_mask_zyx() -> np.ndarray:
    """An ellipsoidal ROI of exactly ROI_VOXELS voxels (Z, Y, X)."""
    g = np.stack(np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE[1:]), indexing="ij"))
    r = ((g / np.array([0.5, 0.6, 0.5])[:, None, None, None]) ** 2).sum(0)
    mask = np.zeros(r.size, bool)
    mask[np.argsort(r, axis=None, kind="stable")[:ROI_VOXELS]] = True
    return mask.reshape(r.shape)


def make_session(path: Path) -> None:
    import h5py

    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("betas", shape=SHAPE, dtype="int16", chunks=(SHAPE[0], 1, 1, 1))
        for z in range(SHAPE[1]):
            ds[:, z] = rng.integers(-3000, 3000, size=(SHAPE[0], *SHAPE[2:]), dtype=np.int16)


def run_method(method: str, path: str, mask_path: str) -> dict:
    """Runs in a child process: time one method, report wall time, peak RSS and a checksum."""
    import h5py

    from braid.betas import read_session  # imports outside the timed region, for every method

    mask = np.load(mask_path)
    t0 = time.perf_counter()
    if method == "peers":
        with h5py.File(path, "r") as f:
            x = f["betas"][:][:, mask].astype(np.float32) / 300
    elif method == "braid":
        x = read_session(path, mask)
    elif method == "chunk-bytes":
        with h5py.File(path, "r") as f:
            read = f["betas"].id.read_direct_chunk
            x = [read((0, z, y, xx))[1] for z, y, xx in np.argwhere(mask).tolist()]
    elif method == "pread-floor":
        offsets = np.load(mask_path.replace(".npy", "-offsets.npy"))
        t0 = time.perf_counter()  # offsets were located beforehand: this is the I/O floor
        order = np.argsort(offsets)
        o = offsets[order]
        size = SHAPE[0] * 2
        breaks = np.flatnonzero(o[1:] != o[:-1] + size) + 1
        starts, ends = np.r_[0, breaks], np.r_[breaks, o.size]
        fd = os.open(path, os.O_RDONLY)
        x = np.empty((o.size, SHAPE[0]), np.int16)
        for a, b in zip(starts.tolist(), ends.tolist()):
            buf = os.pread(fd, int(o[b - 1] + size - o[a]), int(o[a]))
            x[order[a:b]] = np.frombuffer(buf, "<i2").reshape(b - a, SHAPE[0])
        os.close(fd)
        x = x.T
    else:
        raise ValueError(method)
    wall = time.perf_counter() - t0
    checksum = float(np.asarray(x, dtype=np.float64).sum()) if method != "chunk-bytes" else float(len(x))
    return {"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "checksum": checksum}


def chunk_offsets(path: Path, mask: np.ndarray) -> np.ndarray:
    import h5py

    wanted = {tuple(c) for c in np.argwhere(mask).tolist()}
    found = {}

    def visit(info):
        key = info.chunk_offset[1:]
        if key in wanted:
            found[key] = info.byte_offset

    with h5py.File(path, "r") as f:
        f["betas"].id.chunk_iter(visit)
    return np.array([found[tuple(c)] for c in np.argwhere(mask).tolist()], np.int64)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=None, help="where to write the 1.1 GB session (default: a temp dir)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_method(*args.child)))
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        path = Path(tmp) / "betas_session01.hdf5"
        mask_path = Path(tmp) / "roi.npy"
        t = time.perf_counter()
        make_session(path)
        mask = roi_mask_zyx()
        np.save(mask_path, mask)
        np.save(str(mask_path).replace(".npy", "-offsets.npy"), chunk_offsets(path, mask))
        print(f"session {SHAPE} int16, {path.stat().st_size / 1e9:.2f} GB, ROI {mask.sum()} voxels "
              f"(ideal bytes {mask.sum() * SHAPE[0] * 2 / 1e6:.1f} MB); written in {time.perf_counter() - t:.0f} s")
        with open(path, "rb") as f:  # warm the page cache once, untimed
            while f.read(64 << 20):
                pass
        results = {}
        for method in ("peers", "braid", "chunk-bytes", "pread-floor"):
            runs = []
            for _ in range(args.repeats):
                out = subprocess.run([sys.executable, __file__, "--child", method, str(path), str(mask_path)],
                                     capture_output=True, text=True, check=True)
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            results[method] = {
                "wall_s": float(np.median([r["wall_s"] for r in runs])),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
                "checksum": runs[0]["checksum"],
            }
            print(f"{method:12s} median {results[method]['wall_s']:8.3f} s   peak RSS {results[method]['peak_rss_mb']:7.0f} MB")
        # same values: BRAID's masking equals the peers' (and the raw bytes, /300)
        assert np.isclose(results["peers"]["checksum"], results["braid"]["checksum"], rtol=1e-6)
        assert np.isclose(results["pread-floor"]["checksum"] / 300, results["braid"]["checksum"], rtol=1e-6)
        b = results["braid"]["wall_s"]
        print(f"peers / braid          = {results['peers']['wall_s'] / b:6.1f}x   (goal >= 10x)")
        print(f"braid / chunk-bytes    = {b / results['chunk-bytes']['wall_s']:6.2f}x  (goal <= 1.5x)")
        print(f"braid / pread-floor    = {b / results['pread-floor']['wall_s']:6.2f}x  (I/O floor with offsets known)")
        print(f"peak RSS peers / braid = {results['peers']['peak_rss_mb'] / results['braid']['peak_rss_mb']:6.1f}x")


if __name__ == "__main__":
    from braid.common import exit_on_sigterm

    exit_on_sigterm()  # a killed run removes its 1 GB temporary folder
    main()
