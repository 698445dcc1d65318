"""The full-scale rehearsal: the real configuration at NSD's and SSD-1B's real shapes, on a CPU.

``make rehearsal`` (or ``python -m braid.rehearsal``) does three things:

1. **A real-scale synthetic subject** (:func:`write_bucket`): subj01's functional volume
   (81 x 104 x 83 at 1.8 mm), an ``nsdgeneral`` of exactly subj01's 15,724 voxels, 750-trial
   sessions in NSD's (750, 1, 1, 1) int16 chunks, the real 30,000-trial design (10,000 images
   per subject, 1,000 shared, 73,000 in ``imgBrick``), with the bucket's real key names. Only
   the images the written sessions show are stored in ``imgBrick`` (the others are unallocated
   HDF5 chunks: zero bytes on disk), and the betas' NIfTI twins are not written (BRAID reads the
   HDF5 files). Beside it, COCO's caption zip in miniature (:func:`write_caption_zip`: five
   captions of every one of the 73,000 images, in COCO's format), which ``captions_fetch``
   downloads over HTTP as it would COCO's own. The signal is a random linear map of the images' 16 x 16 thumbnails, so that
   no 512-pixel VAE pass is needed to make the data; with random model weights no result is
   meaningful anyway.
2. **Serves it over loopback S3** (s3rver, an S3 server that answers ranged GETs from disk) at
   the endpoint of ``config/rehearsal.yaml``, exactly as the public bucket would be: the fetch
   rules run unchanged in ROI-only mode, anonymously; the caption zip is one more object there.
3. **Runs the workflow** on ``config/nsd_ssd1b.yaml`` plus ``config/rehearsal.yaml`` (fewer
   sessions, trials, epochs and steps; the SSD-1B architecture with random weights; the metric
   networks' real architectures with random weights) in ``rehearsal/``, then prints and writes
   each rule's peak memory and wall time (:mod:`braid.jobstats`) and their extrapolation to
   the full experiment (:func:`extrapolate`).

Every output is stamped: the model's and metric networks' weights are random (figures and
tables say "NOT A RESULT"), the run lives in ``rehearsal/`` and its ``REHEARSAL.md`` says what
it was.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from . import captions as braid_captions
from . import config as braid_config
from . import nsd, synthetic
from .common import BraidError, atomic_output, exit_on_sigterm


SUBJECT = 1
VOLUME = (81, 104, 83)  # subj01's func1pt8mm volume (X, Y, Z)
ROI_VOXELS = nsd.NSDGENERAL_VOXELS[SUBJECT]
BUCKET_MARKER = ".braid-rehearsal-bucket.json"
THUMB = 16  # the signal's image features: 16 x 16 x 3 thumbnails
# COCO's annotation zip, served beside the bucket's keys (captions.source of config/rehearsal.yaml)
CAPTIONS_KEY = f"coco/{braid_captions.ANNOTATIONS_ZIP}"


def bucket_config(sessions: int = 2, seed: int = 0) -> dict:
    """The synthetic block at NSD's real scale: 40 x 750 trials in the design, ``sessions`` written."""
    return {
        "seed": seed, "subjects": [SUBJECT], "sessions": sessions, "design_sessions": 40,
        "trials_per_session": nsd.TRIALS_PER_SESSION, "images_per_subject": 10_000, "shared_images": 1_000,
        "extra_images": 63_000, "volume": list(VOLUME), "gain": 2.0, "noise_sd": 1.0,
    }


def rois_of_size(dims, rng: np.random.Generator, voxels: int) -> dict[str, np.ndarray]:
    """:func:`braid.synthetic.make_rois` with an ``nsdgeneral`` of ``voxels`` voxels."""
    state = rng.bit_generator.state
    brain = int((synthetic.make_rois(dims, rng, 0.5)["brainmask"] > 0).sum())
    rng.bit_generator.state = state  # the same jitter again, now with the fraction that gives `voxels`
    return synthetic.make_rois(dims, rng, voxels / brain)


def thumbnails(images: np.ndarray) -> np.ndarray:
    """(n, 425, 425, 3) uint8 -> (n, 16*16*3) float64 block means (PIL's box filter)."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(im).resize((THUMB, THUMB), Image.Resampling.BOX), np.float64).ravel()
                     for im in images])


def write_bucket(root: str | os.PathLike, sessions: int = 2, seed: int = 0, volume=VOLUME, roi_voxels: int = ROI_VOXELS,
                 progress: bool = True) -> dict:
    """Write the real-scale synthetic subject under ``root`` with the bucket's keys; return its metadata.

    ``volume`` and ``roi_voxels`` are subj01's; smaller ones make a quick test of the same design.
    """
    import h5py
    from tqdm import tqdm

    root = Path(root)
    cfg = {**bucket_config(sessions, seed), "volume": list(volume)}
    rng = np.random.default_rng(seed)
    design = synthetic.make_design(cfg, rng)
    info = synthetic.write_design_files(root, design, [SUBJECT], rng)

    # the images the written sessions show; every other row of imgBrick stays unallocated
    trials = sessions * nsd.TRIALS_PER_SESSION
    ids = design["subjectim"][SUBJECT - 1, design["masterordering"].ravel()[:trials] - 1] - 1  # 0-based per trial
    shown = np.unique(ids)
    features = np.empty((shown.size, THUMB * THUMB * 3))
    made = {}  # nsd id -> what made the stored image (its captions say it)
    size = synthetic.IMAGE_SIZE
    with atomic_output(root / nsd.STIMULI) as tmp, h5py.File(tmp, "w") as f:
        brick = f.create_dataset("imgBrick", shape=(design["n_images"], size, size, 3), dtype="uint8",
                                 chunks=(1, size, size, 3))
        for start in tqdm(range(0, shown.size, 100), desc="stimuli", unit="x100 images", disable=not progress):
            batch, attributes = synthetic.make_stimuli(min(100, shown.size - start), rng, attributes=True)
            for k, img in enumerate(batch):
                brick[shown[start + k]] = img
                made[int(shown[start + k])] = attributes[k]
            features[start : start + len(batch)] = thumbnails(batch)
    s = (features - features.mean(0)) / (features.std(0) + 1e-8)

    rois = rois_of_size(volume, rng, roi_voxels)
    synthetic._save_nifti(rois["brainmask"], root / nsd.brainmask_key(SUBJECT))
    for name in rois:
        if name != "brainmask":
            synthetic._save_nifti(rois[name], root / nsd.roi_key(SUBJECT, name))
    ncsnr = np.where(rois["nsdgeneral"] > 0, 1.0 / cfg["noise_sd"], 0.0).astype(np.float32)
    synthetic._save_nifti(ncsnr, root / nsd.ncsnr_key(SUBJECT))
    brain_zyx = rois["brainmask"].T > 0
    roi_zyx = rois["nsdgeneral"].T > 0
    in_roi = roi_zyx[brain_zyx]
    weights = rng.standard_normal((s.shape[1], int(roi_zyx.sum())), dtype=np.float32)
    signal = (s.astype(np.float32) @ weights)
    signal /= signal.std(0)
    row = {int(i): k for k, i in enumerate(shown)}
    n_brain = int(brain_zyx.sum())
    for session in tqdm(range(1, sessions + 1), desc="betas", unit="session", disable=not progress):
        t = ids[(session - 1) * nsd.TRIALS_PER_SESSION : session * nsd.TRIALS_PER_SESSION]
        x = cfg["noise_sd"] * rng.standard_normal((t.size, n_brain), dtype=np.float32)
        x[:, in_roi] += signal[[row[int(i)] for i in t]]
        stored = np.clip(np.round(cfg["gain"] * x * 300), -32767, 32767).astype(np.int16)
        del x
        synthetic.write_betas(root / nsd.betas_key(SUBJECT, session), stored, brain_zyx)
    write_caption_zip(root / CAPTIONS_KEY, info, made, seed)
    return {"rehearsal": True, "config": cfg, "roi_voxels": int(roi_zyx.sum()), "brain_voxels": n_brain,
            "images_stored": int(shown.size), "volume": list(volume)}


def write_caption_zip(path: str | os.PathLike, info: pd.DataFrame, made: dict[int, dict], seed: int = 0) -> None:
    """COCO's ``annotations_trainval2017.zip`` in miniature at ``path``: only its two caption members
    (``annotations/captions_{train,val}2017.json``, COCO's format), with five captions of every row of
    the stim info ``info``. An image in ``made`` (nsd id -> :func:`braid.synthetic.make_stimuli`'s
    attributes) is described as it was made; the others (never stored) from a random draw."""
    import zipfile

    rng = np.random.default_rng([seed, 3])
    n = len(info)
    category = rng.integers(len(synthetic.CATEGORIES), size=n)
    share, flips, gains = rng.uniform(0.35, 1.0, size=n), rng.random(n) < 0.25, rng.uniform(0.6, 1.4, size=(n, 3))
    every = [made.get(i) or {"category": int(category[i]), "share": float(share[i]), "upside_down": bool(flips[i]),
                             "gains": gains[i].tolist()} for i in range(n)]
    captions = synthetic.make_captions(every, rng)
    with tempfile.TemporaryDirectory() as tmp, atomic_output(path) as out:
        synthetic.write_coco_captions(tmp, info, captions)
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for split, member in braid_captions.CAPTION_MEMBERS.items():
                zf.write(Path(tmp) / synthetic.CAPTION_KEYS[split], member)


# --------------------------------------------------------------------------------------------
# Serving the bucket: s3rver on loopback
# --------------------------------------------------------------------------------------------


def s3rver_binary(prefix: Path) -> Path:
    """s3rver's command under ``prefix`` (npm), installed there first if missing."""
    binary = prefix / "node_modules" / ".bin" / "s3rver"
    if not binary.exists():
        if not shutil.which("npm"):
            raise BraidError("the rehearsal serves its bucket with s3rver, an npm package, and npm is not installed: "
                             "install Node.js (Debian: apt-get install nodejs npm) and run again")
        subprocess.run(["npm", "install", "--silent", "--prefix", str(prefix), "s3rver@3"], check=True)
    return binary


def start_s3rver(binary: Path, directory: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Serve ``directory`` with s3rver on loopback at ``port`` (a free one if None); return it and its endpoint."""
    with socket.socket() as s:
        if port is None:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        elif s.connect_ex(("127.0.0.1", port)) == 0:
            raise BraidError(f"port {port} (nsd.endpoint_url of config/rehearsal.yaml) is in use: stop what listens "
                             "there, or change the port in config/rehearsal.yaml")
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([str(binary), "--directory", str(directory), "--address", "127.0.0.1", "--port",
                             str(port), "--silent"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"http://127.0.0.1:{port}"
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise BraidError(f"{binary} did not start on port {port}")


def upload(root: Path, endpoint: str) -> None:
    """Every file under ``root`` into NSD's bucket name at ``endpoint``, readable anonymously."""
    import boto3

    admin = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-2",
                         aws_access_key_id="S3RVER", aws_secret_access_key="S3RVER")
    if nsd.BUCKET not in [b["Name"] for b in admin.list_buckets().get("Buckets", [])]:
        admin.create_bucket(Bucket=nsd.BUCKET)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        admin.upload_file(str(path), nsd.BUCKET, path.relative_to(root).as_posix(), ExtraArgs={"ACL": "public-read"})


# --------------------------------------------------------------------------------------------
# The table: measured per rule, extrapolated to the full experiment
# --------------------------------------------------------------------------------------------

GRADIENT = "encoder_train (mlp, student)"
CLOSED_FORM = "encoder_train (ridge, lowrank)"
SEMANTIC_GRADIENT = "semantic_train (mlp, student)"
SEMANTIC_CLOSED_FORM = "semantic_train (ridge, lowrank)"
# How each rule's work grows from the rehearsal to the full experiment (40 sessions of 750 trials,
# 10,000 images, 200 epochs, 1,000 test images x strengths x seeds): the unit its wall time is
# proportional to. Peak memory is measured at real shapes (one session, one batch, the whole
# model) and stays, except where a job holds data that grow: encoder_train holds every training
# trial's voxels and latents (float32, plus their z-scored copies).
SCALING = {
    "nsd_fetch_betas_roi": "sessions",
    "nsd_fetch_stimuli_rows": "images",
    "betas_mask": "sessions",
    "latents_encode": "images",
    "latents_statistics": "images",
    GRADIENT: "trials x epochs",
    CLOSED_FORM: None,  # 105 trials take RidgePath's n x n route, 27,000 its p x p one: not linear, not extrapolated
    "betas_mask_semantic": "sessions",
    "semantic_encode": "images",  # five captions per image through both text encoders, once
    "semantic_bank": "images",
    SEMANTIC_GRADIENT: "trials x epochs",
    SEMANTIC_CLOSED_FORM: None,
    "reconstruct_decode": "test images",
    "reconstruct_conditioning": "test images",
    "reconstruct_img2img": "test images x steps",
    "evaluate_stimuli": "test images",
    "evaluate_images": "test images",
}
LATENT_DIM = 4 * 64 * 64  # SDXL-VAE latents of 512-pixel images


def full_scale_units(run: dict, full: dict) -> dict[str, float]:
    """How many times more of each unit the full experiment has than the rehearsal ``run``."""
    return {
        "sessions": full["sessions"] / run["sessions"],
        "images": full["images"] / run["images"],
        "trials x epochs": (full["trials"] * full["epochs"]) / (run["trials"] * run["epochs"]),
        "test images": full["test_images"] / run["test_images"],
        "test images x steps": (full["test_images"] * full["steps"]) / (run["test_images"] * run["steps"]),
    }


def declared_memory(dry_run: str) -> dict[str, int]:
    """Each job's ``mem_mb`` in the text of ``snakemake -n --forceall`` on a finished run (sized from
    its inputs, as SLURM would get it), by the job's benchmark record (``<rule>/<job>``)."""
    out, bench = {}, None
    for line in dry_run.splitlines():
        line = line.strip()
        if line.startswith("benchmark: logs/benchmark/"):
            bench = line[len("benchmark: logs/benchmark/") :].removesuffix(".tsv")
        elif line.startswith("resources:") and bench:
            for item in line[len("resources:") :].split(","):
                key, _, value = item.strip().partition("=")
                if key == "mem_mb":
                    out[bench] = int(value)
            bench = None
    return out


def with_declared(jobs: pd.DataFrame, declared: dict[str, int]) -> pd.DataFrame:
    """Per job, the ``mem_mb`` its rule declares next to its measured peak."""
    jobs = jobs.copy()
    jobs["mem_mb"] = [declared.get(f"{r}/{j}", np.nan) for r, j in zip(jobs["rule"], jobs["job"])]
    return jobs


def rule_table(jobs: pd.DataFrame, kinds: dict[str, str], semantic_kinds: dict[str, str] | None = None
               ) -> pd.DataFrame:
    """:func:`braid.jobstats.by_rule` of the run's jobs, with ``encoder_train`` and ``semantic_train``
    each split into their gradient-trained (mlp, student) and closed-form (ridge, lowrank) jobs;
    ``kinds``, ``semantic_kinds``: encoder -> kind."""
    from . import jobstats

    jobs = jobs.copy()
    split = {"encoder_train": (kinds, CLOSED_FORM, GRADIENT),
             "semantic_train": (semantic_kinds or {}, SEMANTIC_CLOSED_FORM, SEMANTIC_GRADIENT)}
    for rule, (of, closed, gradient) in split.items():
        rows = (jobs["rule"] == rule).to_numpy()
        names = [Path(j).parts[1] for j in jobs.loc[rows, "job"]]  # <subject>/<encoder>/train
        jobs.loc[rows, "rule"] = [closed if of.get(n) in ("ridge", "lowrank") else gradient for n in names]
    table = jobstats.by_rule(jobs)
    if "mem_mb" in jobs:  # per rule, the job that comes closest to (or beyond) its declared memory
        ratio = jobs["max_rss"] / jobs["mem_mb"].astype(float)
        worst = jobs.assign(ratio=ratio).sort_values("ratio", ascending=False).groupby("rule").head(1)
        table = table.merge(worst[["rule", "mem_mb", "ratio"]].rename(columns={"ratio": "peak_over_declared"}),
                            on="rule", how="left")
    return table


def extrapolate(per_rule: pd.DataFrame, run: dict, full: dict, voxels: int = ROI_VOXELS,
                semantic: tuple[int, int] | None = None) -> pd.DataFrame:
    """Per rule: the rehearsal's largest job (s, MB) and the same job at full scale.

    Time is linear in the rule's unit (:data:`SCALING`; none for the closed-form encoders). Memory
    is the measured peak, plus for gradient-trained encoders the data they add: (full - rehearsal)
    trials x (voxels + target dims) x 4 bytes x 2; the closed-form encoders get
    :func:`braid.resources.ridge_path_mb` at full scale (what their rule asks for). ``voxels`` and
    the latent dims are the latent route's; ``semantic`` is the semantic encoders' (voxels, target
    dims) (:func:`semantic_shape`; without it their memory stays as measured).
    """
    from .resources import ridge_path_mb

    factor = full_scale_units(run, full)
    shapes = {GRADIENT: (voxels, LATENT_DIM), CLOSED_FORM: (voxels, LATENT_DIM),
              SEMANTIC_GRADIENT: semantic, SEMANTIC_CLOSED_FORM: semantic}  # (voxels, target dims)
    rows = []
    for r in per_rule.itertuples():
        unit = SCALING.get(r.rule)
        closed_form = r.rule in (CLOSED_FORM, SEMANTIC_CLOSED_FORM)
        f = factor[unit] if unit else (np.nan if closed_form else 1.0)
        memory = r.max_rss_mb
        if shapes.get(r.rule) is not None:
            p, d = shapes[r.rule]
            if closed_form:
                memory = max(memory, ridge_path_mb(full["trials"], p, d))
            else:
                memory += (full["trials"] - run["trials"]) * (p + d) * 4 * 2 / 2**20
        rows.append({"rule": r.rule, "jobs": r.jobs, "max_s": r.max_s, "max_rss_mb": r.max_rss_mb,
                     "declared_mb": getattr(r, "mem_mb", np.nan),
                     "peak_over_declared": getattr(r, "peak_over_declared", np.nan),
                     "scales_with": unit or "-", "factor": f, "full_s": r.max_s * f, "full_rss_mb": memory})
    return pd.DataFrame(rows)


def run_units(workdir: Path, config: dict) -> dict:
    """The rehearsal's own sizes, read from what it wrote."""
    trials = pd.read_parquet(workdir / "results" / f"subj{SUBJECT:02d}" / "trials.parquet")
    test = trials.loc[trials["split"] == "test", "nsd_id"].nunique()
    enc = next(iter(config["encoders"].values()))
    return {"sessions": len(config["sessions"]), "images": int(trials["nsd_id"].nunique()),
            "trials": int((trials["split"] == "train").sum()),
            "epochs": int(enc.get("epochs", 1)), "test_images": int(test), "steps": int(config["reconstruct"]["steps"])}


def semantic_shape(workdir: Path, config: dict) -> tuple[int, int] | None:
    """The semantic encoders' (voxels, largest target dims) in the run, None without a semantic route:
    the semantic ROI's voxels as masked, and the pooled text embedding plus, where an encoder targets
    the tokens, their components (as the semantic_train rule sizes its memory)."""
    from .models import CLIP_BIGG_CONFIG
    from .resources import zarr_shape

    shape = zarr_shape(workdir / "results" / f"subj{SUBJECT:02d}" / "semantic" / "betas.zarr" / "betas")
    if shape is None:
        return None
    tokens = any(cfg.get("target") == "tokens" for cfg in braid_config.all_encoders(config, "semantic_").values())
    return shape[1], CLIP_BIGG_CONFIG["projection_dim"] + (config["semantic"]["token_components"] if tokens else 0)


# the full experiment: 40 sessions, 10,000 images, 200 epochs over the ~27,000 training trials, 1,000 test images, 25 steps
FULL = {"sessions": 40, "images": 10_000, "trials": 27_000, "epochs": 200, "test_images": 1_000, "steps": 25}


def markdown(table: pd.DataFrame) -> str:
    lines = ["| rule | jobs | largest job: wall s | peak MB | declared mem_mb (tightest job) | scales with | x "
             "| full scale: wall h | peak MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        factor = "—" if np.isnan(r.factor) else f"{r.factor:,.0f}"
        hours = "—" if np.isnan(r.full_s) else f"{r.full_s / 3600:,.2f}"
        declared = "—" if np.isnan(r.declared_mb) else f"{r.declared_mb:,.0f} ({r.peak_over_declared:.0%} used)"
        if r.peak_over_declared > 1:
            declared += " **UNDER-DECLARED**"
        lines.append(f"| `{r.rule}` | {r.jobs} | {r.max_s:,.0f} | {r.max_rss_mb:,.0f} | {declared} | {r.scales_with} | "
                     f"{factor} | {hours} | {r.full_rss_mb:,.0f} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------


def _load_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m braid.rehearsal", description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=Path("rehearsal"), help="where the bucket, server and run live")
    ap.add_argument("--override", type=Path, default=Path("config/rehearsal.yaml"))
    ap.add_argument("--cores", default="all")
    ap.add_argument("--bucket-only", action="store_true", help="write and serve-check the bucket, run nothing")
    ap.add_argument("--report-only", action="store_true", help="only print and write the table of a finished run")
    ap.add_argument("snakemake_args", nargs="*", help="more arguments for snakemake (after --)")
    args = ap.parse_args(argv)
    exit_on_sigterm()  # a killed rehearsal stops its S3 server and removes a half-written bucket
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")

    braid_root = Path(__file__).resolve().parents[2]
    layers = [braid_root / "config" / "nsd_ssd1b.yaml", args.override.resolve()]
    config = braid_config.layered(_load_yaml(braid_root / "config" / "config.yaml"), [_load_yaml(p) for p in layers],
                                  _load_yaml(braid_root / "config" / "schema.yaml"))
    endpoint = config["nsd"]["endpoint_url"]
    port = int(endpoint.rsplit(":", 1)[1].strip("/"))
    sessions = max(config["sessions"])
    here = args.dir.resolve()
    store = here / "s3"
    # the bucket is written again when its generator changes (this module, or the synthetic NSD's it calls)
    generator = hashlib.sha256(b"".join(Path(f).read_bytes() for f in (__file__, synthetic.__file__)))
    want = {"sessions": sessions, "seed": 0, "generator": generator.hexdigest()[:12]}

    run = here / "run"
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(braid_root / "Snakefile"), "--directory", str(run),
           "--profile", str(braid_root / "profiles" / "local"), "--cores", str(args.cores),
           "--configfile", *map(str, layers)]
    if args.report_only:
        report(run, config, cmd)
        return 0
    t0 = time.perf_counter()
    server, _ = start_s3rver(s3rver_binary(here / "s3rver"), store, port)
    try:
        marker = store / BUCKET_MARKER
        if not marker.exists() or {k: v for k, v in json.loads(marker.read_text()).items() if k != "bucket"} != want:
            print(f"writing the real-scale synthetic subject ({sessions} sessions) and serving it at {endpoint}")
            with tempfile.TemporaryDirectory(dir=here) as tmp:
                meta = write_bucket(tmp, sessions=sessions)
                upload(Path(tmp), endpoint)
            marker.write_text(json.dumps({**want, "bucket": meta}))
            print(f"bucket: {meta['roi_voxels']} nsdgeneral voxels of {meta['brain_voxels']} in the brain, "
                  f"{meta['images_stored']} images stored, in {time.perf_counter() - t0:.0f} s")
        if args.bucket_only:
            return 0
        run.mkdir(exist_ok=True)
        (run / "REHEARSAL.md").write_text(
            "# A rehearsal, not a result\n\nThis folder is BRAID's full-scale rehearsal (`make rehearsal`): a synthetic "
            "subject at NSD's real shapes served over loopback S3, the SSD-1B architecture and the metric networks "
            "with random weights. Its numbers measure time and memory only.\n")
        print(" ".join(cmd + args.snakemake_args), flush=True)
        t1 = time.perf_counter()
        rc = subprocess.run(cmd + args.snakemake_args).returncode
        wall = time.perf_counter() - t1
    finally:
        server.terminate()
        server.wait()
    if rc != 0:
        print(f"the rehearsal's workflow failed (exit {rc}): this is what the real configuration would hit; "
              f"see the job logs under {run / 'logs'}", file=sys.stderr)
        return rc
    report(run, config, cmd)
    print(f"workflow {wall / 60:.1f} min, rehearsal {(time.perf_counter() - t0) / 60:.1f} min in all")
    return 0


def report(run: Path, config: dict, snakemake: list[str]) -> pd.DataFrame:
    """Write and print the rehearsal's table (``results/job_resources.csv``, ``rehearsal_resources.md``).

    ``snakemake``: the run's command line; a dry run of it with ``--forceall`` tells each job's
    declared ``mem_mb`` (sized from its inputs, as on SLURM), which is set beside its measured peak.
    """
    from . import encoder, jobstats

    kinds = {name: encoder.spec(cfg)["kind"] for name, cfg in braid_config.all_encoders(config).items()}
    semantic_kinds = {name: cfg["kind"] for name, cfg in braid_config.all_encoders(config, "semantic_").items()}
    dry = subprocess.run([*snakemake, "-n", "--forceall"], capture_output=True, text=True)
    jobs = with_declared(jobstats.jobs(run), declared_memory(dry.stdout))
    table = extrapolate(rule_table(jobs, kinds, semantic_kinds), run_units(run, config), FULL,
                        semantic=semantic_shape(run, config))
    with atomic_output(run / "results" / "job_resources.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.1f")
    text = markdown(table)
    with atomic_output(run / "results" / "rehearsal_resources.md") as tmp:
        tmp.write_text(f"Rehearsal units {run_units(run, config)}; full experiment {FULL}.\n\n{text}")
    print(f"\nper rule, the rehearsal's largest job and the same job at the full experiment's scale:\n\n{text}")
    print(f"written to {run / 'results' / 'job_resources.csv'} and rehearsal_resources.md")
    return table


if __name__ == "__main__":
    raise SystemExit(main())
