"""A synthetic NSD: the bucket's keys and file formats at small sizes, with a planted signal.

Generative model (per subject, deterministic from ``seed``)
-----------------------------------------------------------
Let ``z_i`` be the VAE latent of stimulus ``i`` under the configured model (exactly what the
``latents`` stage computes), standardised per dimension over the stimulus set: ``s_i``
(``d`` = 4·h·w dims). Each voxel ``v`` of the subject's ``nsdgeneral`` ROI gets a fixed random
weight vector ``w_v ~ N(0, I_d)``; its response to trial ``t`` showing image ``i`` is

    beta_tv = gain * ( f(a_v · w_v · s_i) + noise_sd * e_tv ),   e_tv ~ N(0, 1) i.i.d.

where ``a_v`` scales the signal to unit variance over the stimuli and ``f`` is the identity or,
with ``nonlinearity: tanh``, a mild saturation ``tanh``. Repeats of an image share the signal,
not the noise. Brain voxels outside the ROI carry ``gain * noise_sd * e``; voxels outside the
brain mask are 0, as in NSD. Betas are stored as NSD does: int16 = percent change x 300.

Meaning: each stimulus has a category (its source photograph, ``category`` in the stimulus
info) and five COCO-format captions from its category and what was done to it
(:func:`make_captions`). The voxels of ``streams`` label 5 (ventral, anterior to
``nsdgeneral``) respond in the same way to ``p_i``, the model's pooled text embedding averaged
over the image's captions (what :mod:`braid.text_embeddings` caches), standardised over the
stimuli, through their own fixed random map, with the signal scaled by ``semantic_gain``
(relative to the trial noise, as the latent signal's unit variance is): on NSD a caption's
embedding is predicted from the ventral stream far less well than the true caption gives it.

Oracle (the reference the encoders are compared with)
-----------------------------------------------------
The *oracle* is the best **linear** decoder of ``s`` from one row of ROI responses ``x``, in
expected squared error, given everything the generator knows: the weights ``A``, the noise
level, and the distribution of ``s`` — estimated from ``prior_images`` *fresh* photographs of
the same generator, never from the stimuli of the data set (their test images included):

    ŝ = μ_s + Cov(s, x) Cov(x)⁻¹ (x − μ_x),   Cov(x) = Cov(f(A s)) + noise_sd² / k · I

for a row that averages ``k`` repeats. (The mean and std that define ``s`` from ``z`` are part
of the generative model, so the oracle knows them; the prior is what it must not take from the
data.) The generator writes its ingredients (fresh ``s`` and
noise-free responses ``f(A s)``) to ``braid_oracle/subjNN.npz``; the workflow's
``evaluate_oracle`` rule applies the oracle to exactly the test rows of ``trials.parquet``
(read from the fetched betas, as the encoders' data) and scores it with the encoders' own
latent metrics. What it bounds: the expected squared error of any decoder that is linear in
one row's voxels (an encoder of that family, trained on finite data, should not beat it
beyond sampling error of the test set). It is not a bound for nonlinear decoders (with a
non-Gaussian ``s``, or ``nonlinearity: tanh``, a nonlinear decoder can do better), and not
strictly one for correlation or 2-way identification, which it is reported with. The semantic
oracle is the same decoder of ``p`` from the ventral voxels (``braid_oracle/subjNN-semantic.npz``).
Both are applied by :mod:`braid.oracle`.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from . import nsd
from .common import BraidError, atomic_output, subject_label

log = logging.getLogger(__name__)

IMAGE_SIZE = 425
ROIS = ("nsdgeneral", "prf-visualrois", "streams")
META = "braid_synthetic.json"
_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "clock", "moon",
    "brick", "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "retina",
)  # fmt: skip


def oracle_key(subject: int, target: str = "latent") -> str:
    """The oracle's ingredients for ``subject`` beside the mirror (see the module docstring):
    of the latent, or (``target="semantic"``) of the pooled text embedding."""
    return f"braid_oracle/{subject_label(subject)}{'' if target == 'latent' else '-' + target}.npz"


# what generate_stimuli writes (no model needed); the rest depends on the model's latents
# COCO-format captions of the stimuli, where COCO's annotations_trainval2017.zip puts them (under coco/)
CAPTION_KEYS = {split: f"coco/annotations/captions_{split}.json" for split in ("train2017", "val2017")}
CAPTION_FOLDER = "coco"  # the folder a captions source names (braid.captions reads <folder>/annotations/)
STIMULUS_KEYS = (*CAPTION_KEYS.values(), nsd.EXPDESIGN, nsd.STIM_INFO, nsd.STIM_INFO_PKL, nsd.STIMULI)
# the keys of the synthetic block that decide those files (a change of noise or volume leaves them be)
STIMULUS_CONFIG_KEYS = ("design_sessions", "extra_images", "images_per_subject", "seed", "sessions", "shared_images",
                        "subjects", "trials_per_session")


def stimulus_config(cfg: dict) -> dict:
    """The part of the synthetic block that decides the stimuli and design (:data:`STIMULUS_CONFIG_KEYS`)."""
    return {k: cfg[k] for k in STIMULUS_CONFIG_KEYS if k in cfg}


def keys(cfg: dict, resolution: str = "func1pt8mm", beta_version: str = "betas_fithrf_GLMdenoise_RR") -> list[str]:
    """Every bucket key the generator writes for ``cfg`` (the synthetic block of the config)."""
    out = list(STIMULUS_KEYS)
    for s in cfg["subjects"]:
        out += [nsd.brainmask_key(s, resolution), nsd.ncsnr_key(s, resolution, beta_version)]
        out += [nsd.roi_key(s, f"{hemi}{roi}", resolution) for roi in ROIS for hemi in ("", "lh.", "rh.")]
        for n in range(1, cfg["sessions"] + 1):
            key = nsd.betas_key(s, n, resolution, beta_version)
            out += [key, key.replace(".hdf5", ".nii.gz")]
    return out


# --------------------------------------------------------------------------------------------
# Stimuli
# --------------------------------------------------------------------------------------------


def make_stimuli(n: int, rng: np.random.Generator, attributes: bool = False):
    """``n`` distinct 425x425 RGB photographs: random crops, flips and colour shifts of skimage's samples.

    With ``attributes`` also what made each one (:func:`describe`'s input): its category (the
    index of its source photograph in :data:`CATEGORIES`), the crop's share of the photograph,
    the flips and the colour gains; the random draws, and so the images, are the same either way.
    """
    import skimage.data
    from PIL import Image

    sources = []
    for name in _PHOTOS:
        img = getattr(skimage.data, name)()
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=-1)
        sources.append(Image.fromarray(np.ascontiguousarray(img[..., :3])))
    out = np.empty((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    made = []
    for k in range(n):
        category = int(rng.integers(len(sources)))
        src = sources[category]
        w, h = src.size
        share = rng.uniform(0.35, 1.0)
        side = int(min(h, w) * share)
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        img = src.crop((x, y, x + side, y + side)).resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC)
        img = np.asarray(img, np.float32) / 255.0
        mirrored, upside_down = bool(rng.random() < 0.5), False
        if mirrored:
            img = img[:, ::-1]
        if rng.random() < 0.25:
            img, upside_down = img[::-1], True
        gains = rng.uniform(0.6, 1.4, size=3)
        img = img * gains + rng.uniform(-0.15, 0.15, size=3)
        out[k] = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
        made.append({"category": category, "share": float(share), "mirrored": mirrored, "upside_down": upside_down,
                     "gains": gains.tolist()})
    return (out, made) if attributes else out


# --------------------------------------------------------------------------------------------
# Captions: five per image, in COCO's format, from what made the image
# --------------------------------------------------------------------------------------------

CATEGORIES = _PHOTOS  # a stimulus's category is its source photograph
# what each source photograph shows, several ways of saying it
_NOUNS = {
    "astronaut": ["an astronaut", "a person in a space suit", "a smiling astronaut", "an astronaut with a flag"],
    "chelsea": ["a cat", "a tabby cat", "a kitten", "a cat looking to the side"],
    "coffee": ["a cup of coffee", "a coffee cup on a saucer", "a mug of coffee", "a cup of espresso"],
    "rocket": ["a rocket", "a rocket on a launch pad", "a space rocket", "a rocket before launch"],
    "camera": ["a man with a camera", "a photographer", "a man holding a camera on a tripod", "a cameraman"],
    "coins": ["coins", "a pile of old coins", "some ancient coins", "a collection of coins"],
    "clock": ["a clock", "a wall clock", "a clock face", "an old clock"],
    "moon": ["the moon", "the surface of the moon", "craters on the moon", "the lunar surface"],
    "brick": ["a brick wall", "bricks", "a wall of red bricks", "a section of brick wall"],
    "grass": ["grass", "a lawn", "a patch of green grass", "blades of grass"],
    "gravel": ["gravel", "small stones", "a gravel path", "pebbles on the ground"],
    "hubble_deep_field": ["galaxies in deep space", "a starry sky", "distant galaxies", "a telescope image of space"],
    "immunohistochemistry": ["stained cells under a microscope", "a tissue sample", "cells in a microscope slide",
                             "a stained tissue section"],
    "retina": ["an image of a retina", "the back of an eye", "a retinal scan", "an eye fundus photograph"],
}
_TEMPLATES = ["{noun}{details}.", "A photo of {noun}{details}.", "A picture of {noun}{details}.",
              "A view of {noun}{details}.", "An image showing {noun}{details}.", "Here is {noun}{details}."]
MAX_CAPTION = 75  # characters: the tiny model's byte-level tokenizer fits 75 in CLIP's 77 tokens


def describe(made: dict) -> list[str]:
    """The visible attributes of a stimulus (its zoom, flips, colour cast, brightness) as phrases."""
    out = []
    if made["share"] < 0.55:
        out.append("close up")
    elif made["share"] > 0.85:
        out.append("from far away")
    if made["upside_down"]:
        out.append("upside down")
    gains = np.asarray(made["gains"])
    if gains.max() - gains.min() > 0.35:
        out.append(("with a red tint", "with a green tint", "with a blue tint")[int(gains.argmax())])
    if gains.mean() > 1.15:
        out.append("in bright light")
    elif gains.mean() < 0.85:
        out.append("in dim light")
    return out


def make_captions(made: list[dict], rng: np.random.Generator, per_image: int = 5) -> list[list[str]]:
    """``per_image`` varied captions of each stimulus: its category's nouns, templates, and a random
    subset of its attributes (:func:`describe`), as five annotators would word it differently."""
    out = []
    for m in made:
        nouns, phrases, captions = _NOUNS[CATEGORIES[m["category"]]], describe(m), []
        for _ in range(per_image):
            noun = nouns[int(rng.integers(len(nouns)))]
            kept = [p for p in phrases if rng.random() < 0.7]
            template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
            text = template.format(noun=noun, details="".join(f", {p}" for p in kept))
            while len(text) > MAX_CAPTION and kept:  # fewer details rather than a truncated caption
                kept.pop()
                text = template.format(noun=noun, details="".join(f", {p}" for p in kept))
            captions.append(text[0].upper() + text[1:])
        out.append(captions)
    return out




def write_coco_captions(out_dir: str | os.PathLike, info: pd.DataFrame, captions: list[list[str]]) -> None:
    """COCO-format caption files (``images``, ``annotations`` with ``image_id``/``id``/``caption``) for
    the stimulus-info rows, split by ``cocoSplit``, at :data:`CAPTION_KEYS` (where COCO's
    ``annotations_trainval2017.zip`` puts them, under ``coco/``). Annotation ids are unique
    across both files and not in image order, as COCO's are."""
    rng = np.random.default_rng(len(info))
    ann_ids = rng.permutation(sum(len(c) for c in captions)) + 1
    next_id = iter(ann_ids.tolist())
    for split, key in CAPTION_KEYS.items():
        rows = info[info["cocoSplit"] == split]
        images, annotations = [], []
        for nsd_id, coco_id in zip(rows.index.tolist(), rows["cocoId"].tolist()):
            images.append({"id": int(coco_id), "file_name": f"{int(coco_id):012d}.jpg", "height": IMAGE_SIZE,
                           "width": IMAGE_SIZE})
            annotations += [{"image_id": int(coco_id), "id": next(next_id), "caption": c} for c in captions[nsd_id]]
        doc = {"info": {"description": "BRAID synthetic captions in COCO's format"}, "licenses": [],
               "images": images, "annotations": annotations}
        with atomic_output(Path(out_dir) / key) as tmp:
            Path(tmp).write_text(json.dumps(doc))


# --------------------------------------------------------------------------------------------
# Design: expdesign.mat and the stimulus-info CSV
# --------------------------------------------------------------------------------------------


def make_design(cfg: dict, rng: np.random.Generator) -> dict:
    """Image assignment and trial order, 1-based as NSD stores them."""
    subjects = sorted(cfg["subjects"])
    # the design may be longer than the betas written (NSD's 40 sessions, betas for the first few)
    n_trials = max(cfg.get("design_sessions") or 0, cfg["sessions"]) * cfg["trials_per_session"]
    per_subject = cfg["images_per_subject"]
    n_shared = cfg["shared_images"]
    if n_shared > per_subject:
        raise BraidError(f"synthetic.shared_images ({n_shared}) exceeds synthetic.images_per_subject ({per_subject})")
    if 3 * per_subject < n_trials:
        raise BraidError(
            f"synthetic: {n_trials} trials need at least {-(-n_trials // 3)} images per subject "
            f"(each is shown at most 3 times); raise synthetic.images_per_subject"
        )
    n_unique = per_subject - n_shared
    n_images = n_shared + len(subjects) * n_unique + cfg.get("extra_images", 0)
    ids = rng.permutation(n_images) + 1  # 1-based 73k ids
    shared = np.sort(ids[:n_shared])
    subjectim = np.zeros((8, per_subject), dtype=np.int32)
    for k, s in enumerate(subjects):
        unique = ids[n_shared + k * n_unique : n_shared + (k + 1) * n_unique]
        subjectim[s - 1] = np.concatenate([shared, unique])  # shared images fill the first slots, as in NSD
    # every slot three times, in random order, cut to the number of trials (NSD's masterordering
    # is the same for all subjects)
    masterordering = rng.permutation(np.repeat(np.arange(1, per_subject + 1), 3))[:n_trials].astype(np.int32)
    return {
        "n_images": n_images,
        "masterordering": masterordering[None, :],
        "subjectim": subjectim,
        "sharedix": shared[None, :].astype(np.int32),
    }


def stim_info_table(design: dict, subjects: list[int], rng: np.random.Generator) -> pd.DataFrame:
    n = design["n_images"]
    df = pd.DataFrame(
        {
            "cocoId": rng.choice(600_000, size=n, replace=False),
            "cocoSplit": np.where(rng.random(n) < 0.9, "train2017", "val2017"),
            "cropBox": ["(0, 0, 0.1671875, 0.1671875)"] * n,
            "loss": np.zeros(n),
            "nsdId": np.arange(n),
            "flagged": False,
            "BOLD5000": False,
            "shared1000": np.isin(np.arange(1, n + 1), design["sharedix"]),
        }
    )
    order = design["masterordering"].ravel()
    for s in range(1, 9):
        df[f"subject{s}"] = 0
    for s in range(1, 9):
        reps = np.zeros((n, 3), dtype=np.int64)
        if s in subjects:
            ids = design["subjectim"][s - 1, order - 1] - 1  # 0-based nsd id per trial
            df[f"subject{s}"] = np.isin(np.arange(n), design["subjectim"][s - 1] - 1).astype(int)
            count = np.zeros(n, dtype=np.int64)
            for t, i in enumerate(ids.tolist()):
                reps[i, count[i]] = t + 1  # 1-based global trial number
                count[i] += 1
        for r in range(3):
            df[f"subject{s}_rep{r}"] = reps[:, r]
    return df


# --------------------------------------------------------------------------------------------
# Volumes
# --------------------------------------------------------------------------------------------


def _affine(dims, res=1.8) -> np.ndarray:
    aff = np.diag([res, res, res, 1.0])
    aff[:3, 3] = -res * (np.asarray(dims) - 1) / 2.0  # origin at the volume centre, as nsd_savenifti
    return aff


def make_rois(dims, rng: np.random.Generator, roi_fraction: float, semantic_fraction: float = 0.06
              ) -> dict[str, np.ndarray]:
    """Brain mask and ROI volumes (X, Y, Z): -1 outside the brain, 0 not in the ROI, labels >= 1.

    ``streams`` follows NSD's labels (1 early, 2 midventral, 3 midlateral, 4 midparietal, 5 ventral,
    6 lateral, 7 parietal): here 1 is the visual half of ``nsdgeneral`` and 5 (ventral) the
    ``semantic_fraction`` of brain voxels just anterior to ``nsdgeneral``, where the semantic
    signal is planted; the other labels are empty."""
    X, Y, Z = dims
    g = np.stack(np.meshgrid(*(np.linspace(-1, 1, d) for d in dims), indexing="ij"))
    jitter = rng.uniform(0.85, 0.95, size=3)
    brain = ((g / jitter[:, None, None, None]) ** 2).sum(0) <= 1.0
    # nsdgeneral: the posterior part of the brain (low y), sized to roi_fraction of brain voxels
    y = g[1] + 0.1 * g[2]
    cut = np.quantile(y[brain], roi_fraction)
    general = brain & (y <= cut)
    nsdgeneral = np.where(brain, 0, -1).astype(np.int16)
    nsdgeneral[general] = 1
    # prf-visualrois: labels 1..7 (V1v, V1d, V2v, V2d, V3v, V3d, hV4) in slabs of the most posterior half
    visual = general & (y <= np.quantile(y[general], 0.5))
    prf = np.where(brain, 0, -1).astype(np.int16)
    ranks = np.argsort(np.argsort(g[2][visual] + 0.5 * g[0][visual]))
    prf[visual] = (1 + ranks * 7 // max(ranks.size, 1)).astype(np.int16)
    streams = np.where(brain, 0, -1).astype(np.int16)
    streams[visual] = 1
    streams[brain & (y > cut) & (y <= np.quantile(y[brain], min(roi_fraction + semantic_fraction, 1.0)))] = 5
    rois = {"brainmask": brain.astype(np.int16), "nsdgeneral": nsdgeneral, "prf-visualrois": prf, "streams": streams}
    # hemisphere files, as NSD ships lh./rh. versions: the other half's labels become 0
    left = np.arange(X)[:, None, None] < X // 2
    for name in ROIS:
        for hemi, side in (("lh.", left), ("rh.", ~left)):
            rois[hemi + name] = np.where(side | (rois[name] < 0), rois[name], 0).astype(np.int16)
    return rois


def _save_nifti(arr: np.ndarray, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(arr, _affine(arr.shape[:3]))
    img.header.set_xyzt_units("mm")
    with atomic_output(path) as tmp:
        nib.save(img, str(tmp) + ".nii.gz")
        os.replace(str(tmp) + ".nii.gz", tmp)


def write_betas_nifti(path: Path, values: np.ndarray, mask_zyx: np.ndarray) -> None:
    """The same betas as NSD's ``betas_sessionNN.nii.gz``: int16 (X, Y, Z, trials), no scaling."""
    vol = np.zeros((values.shape[0], *mask_zyx.shape), dtype=np.int16)
    vol[:, mask_zyx] = values
    _save_nifti(np.ascontiguousarray(vol.transpose(3, 2, 1, 0)), path)


def write_betas(path: Path, values: np.ndarray, mask_zyx: np.ndarray) -> None:
    """Write ``/betas`` (trials, Z, Y, X) int16, chunks (trials, 1, 1, 1), uncompressed, as NSD."""
    import h5py

    vol = np.zeros((values.shape[0], *mask_zyx.shape), dtype=np.int16)
    vol[:, mask_zyx] = values
    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("betas", data=vol, chunks=(vol.shape[0], 1, 1, 1))


# --------------------------------------------------------------------------------------------
# The whole mirror
# --------------------------------------------------------------------------------------------


def generate_stimuli(cfg: dict, out_dir: str | os.PathLike) -> None:
    """Write the mirror's stimuli, design and stimulus-info files (:data:`STIMULUS_KEYS`).

    They need no model, so that a model can be trained on the stimuli (``model.source:
    tiny-trained``) before :func:`generate_betas` plants the signal in that model's latents.
    """
    import h5py

    out = Path(out_dir)
    rng = np.random.default_rng(cfg["seed"])
    subjects = sorted(cfg["subjects"])
    design = make_design(cfg, rng)
    stimuli, made = make_stimuli(design["n_images"], rng, attributes=True)
    with atomic_output(out / nsd.STIMULI) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("imgBrick", data=stimuli, chunks=(1, IMAGE_SIZE, IMAGE_SIZE, 3))
    info = write_design_files(out, design, subjects, rng, [CATEGORIES[m["category"]] for m in made])
    # captions from their own random stream: the files above are as they were before captions existed
    write_coco_captions(out, info, make_captions(made, np.random.default_rng([cfg["seed"], 3])))


def write_design_files(out_dir: str | os.PathLike, design: dict, subjects: list[int], rng: np.random.Generator,
                       categories: list[str] | None = None) -> pd.DataFrame:
    """Write ``design``'s experiment-design MAT file and the stimulus-info table (CSV and pickle) under
    ``out_dir`` with the bucket's keys, as NSD keeps them; return the table. ``categories`` (one per
    image) becomes a ``category`` column, the synthetic data's ground truth of what each image shows."""
    from scipy.io import savemat

    out = Path(out_dir)
    with atomic_output(out / nsd.EXPDESIGN) as tmp:
        savemat(tmp, {k: design[k] for k in ("masterordering", "subjectim", "sharedix")}, format="5")
    info = stim_info_table(design, subjects, rng)
    if categories is not None:
        info["category"] = categories
    with atomic_output(out / nsd.STIM_INFO) as tmp:
        info.to_csv(tmp)
    with atomic_output(out / nsd.STIM_INFO_PKL) as tmp:
        info.to_pickle(tmp, compression=None)
    return info


def stimulus_captions(out_dir: str | os.PathLike, n_images: int) -> list[list[str]]:
    """The captions :func:`generate_stimuli` wrote, per NSD id (0-based), in annotation-id order."""
    info = pd.read_csv(Path(out_dir) / nsd.STIM_INFO, index_col=0)
    by_coco: dict[int, list[tuple[int, str]]] = {}
    for key in CAPTION_KEYS.values():
        for ann in json.loads((Path(out_dir) / key).read_text())["annotations"]:
            by_coco.setdefault(ann["image_id"], []).append((ann["id"], ann["caption"]))
    return [[c for _, c in sorted(by_coco[int(info["cocoId"].iloc[i])])] for i in range(n_images)]


def _mean_pooled(pipe, captions: list[list[str]]) -> np.ndarray:
    """Each image's pooled text embedding, averaged over its captions (float64)."""
    from .text_embeddings import encode_captions

    flat = [c for cs in captions for c in cs]
    _, pooled = encode_captions(pipe, flat, batch_size=256)
    counts = np.array([len(cs) for cs in captions])
    return np.add.reduceat(pooled.astype(np.float64), np.r_[0, np.cumsum(counts)[:-1]], axis=0) / counts[:, None]


def generate(cfg: dict, model_dir: str | os.PathLike, out_dir: str | os.PathLike, image_size: int | None = None,
             resolution: str = "func1pt8mm", beta_version: str = "betas_fithrf_GLMdenoise_RR") -> dict:
    """Write a whole synthetic NSD mirror under ``out_dir`` with the bucket's keys; return its metadata."""
    generate_stimuli(cfg, out_dir)
    return generate_betas(cfg, model_dir, out_dir, image_size, resolution, beta_version)


def generate_betas(cfg: dict, model_dir: str | os.PathLike, out_dir: str | os.PathLike, image_size: int | None = None,
                   resolution: str = "func1pt8mm", beta_version: str = "betas_fithrf_GLMdenoise_RR") -> dict:
    """Write the ROIs, betas and the oracle's ingredients, planting the signal in ``model_dir``'s latents
    of the stimuli that :func:`generate_stimuli` wrote under ``out_dir``; return the mirror's metadata."""
    import h5py
    from scipy.io import loadmat
    from .progress import progress

    from .latents import encode_images
    from .models import load_vae, vae_image_size
    from .text_embeddings import load_text_encoders

    out = Path(out_dir)
    subjects = sorted(cfg["subjects"])
    try:
        with h5py.File(out / nsd.STIMULI, "r") as f:
            stimuli = f["imgBrick"][:]
        design = loadmat(out / nsd.EXPDESIGN)
    except (OSError, KeyError, ValueError) as err:
        raise BraidError(f"{out}: the synthetic stimuli or design are missing or unreadable ({err}); "
                         "rerun the rule nsd_synthetic_stimuli") from err
    rng = np.random.default_rng([cfg["seed"], 2])  # its own stream: the stimuli's rule does not run again

    # the planted signal lives in the standardised latents of the configured model
    vae = load_vae(model_dir)
    size = vae_image_size(vae, image_size)
    z = encode_images(stimuli, vae, size).reshape(len(stimuli), -1).astype(np.float64)
    z_mean, z_std = z.mean(0), z.std(0) + 1e-8
    s_all = (z - z_mean) / z_std
    # the oracle's prior: fresh images of the same generator (own random stream: the data do not change)
    prior_images, prior_made = make_stimuli(cfg["prior_images"], np.random.default_rng([cfg["seed"], 1]), True)
    s_prior = (encode_images(prior_images, vae, size).reshape(len(prior_images), -1) - z_mean) / z_std
    # the semantic signal: the model's pooled text embedding, averaged over each image's captions
    # (what braid.text_embeddings caches), standardised over the stimuli like the latents
    pipe = load_text_encoders(model_dir, dtype="float32")
    p_all = _mean_pooled(pipe, stimulus_captions(out, len(stimuli)))
    p_mean, p_std = p_all.mean(0), p_all.std(0) + 1e-8
    sem_all = (p_all - p_mean) / p_std
    sem_prior = (_mean_pooled(pipe, make_captions(prior_made, np.random.default_rng([cfg["seed"], 5]))) - p_mean) / p_std
    gain, noise_sd, semantic_gain = cfg["gain"], cfg["noise_sd"], cfg.get("semantic_gain", 1.0)
    nonlinear = cfg.get("nonlinearity", "none") == "tanh"

    meta = {"generative_model": __doc__, "config": cfg, "latent_dims": int(z.shape[1]),
            "semantic_dims": int(p_all.shape[1]), "subjects": {}}
    trials_per_session = cfg["trials_per_session"]
    order = design["masterordering"].ravel() - 1
    response = np.tanh if nonlinear else (lambda v: v)
    for s in subjects:
        rois = make_rois(cfg["volume"], rng, cfg["roi_fraction"], cfg.get("semantic_fraction", 0.06))
        _save_nifti(rois["brainmask"], out / nsd.brainmask_key(s, resolution))
        for name in rois:
            if name != "brainmask":
                _save_nifti(rois[name], out / nsd.roi_key(s, name, resolution))
        brain_zyx = rois["brainmask"].T > 0
        roi_zyx = rois["nsdgeneral"].T > 0
        ventral_zyx = rois["streams"].T == 5
        # the noise-ceiling SNR as NSD defines it (signal sd / noise sd), here known exactly: the
        # signal has unit variance in the signal-carrying voxels and none elsewhere
        ncsnr = np.where(rois["nsdgeneral"] > 0, 1.0, np.where(rois["streams"] == 5, semantic_gain, 0.0))
        ncsnr = ncsnr / max(noise_sd, 1e-6)
        _save_nifti(ncsnr.astype(np.float32), out / nsd.ncsnr_key(s, resolution, beta_version))
        in_roi = roi_zyx[brain_zyx]  # ROI voxels, in the order of the brain voxels
        in_ventral = ventral_zyx[brain_zyx]
        n_vox = int(roi_zyx.sum())
        weights = rng.standard_normal((n_vox, z.shape[1]))
        signal = s_all @ weights.T
        scale = 1.0 / signal.std(0)
        signal = response(signal * scale)
        # the ventral voxels' map from the semantic embedding: its own random stream, so that the
        # latent signal and every noise draw are what they were before semantics were planted
        sem_weights = np.random.default_rng([cfg["seed"], 4, s]).standard_normal((int(in_ventral.sum()), p_all.shape[1]))
        sem_signal = sem_all @ sem_weights.T
        sem_scale = 1.0 / sem_signal.std(0)
        sem_signal = semantic_gain * response(sem_signal * sem_scale)
        ids = design["subjectim"][s - 1, order] - 1  # 0-based nsd id of each trial
        for session in progress(range(1, cfg["sessions"] + 1), desc=f"{subject_label(s)} betas", mininterval=2):
            t = slice((session - 1) * trials_per_session, session * trials_per_session)
            noise = noise_sd * rng.standard_normal((trials_per_session, int(brain_zyx.sum())))
            x = noise
            x[:, in_roi] += signal[ids[t]]
            x[:, in_ventral] += sem_signal[ids[t]]
            stored = np.clip(np.round(gain * x * 300), -32767, 32767).astype(np.int16)
            key = nsd.betas_key(s, session, resolution, beta_version)
            write_betas(out / key, stored, brain_zyx)
            write_betas_nifti(out / key.replace(".hdf5", ".nii.gz"), stored, brain_zyx)
        for target, (prior, prior_response, zyx, mean, std) in {
            "latent": (s_prior, response((s_prior @ weights.T) * scale), roi_zyx, z_mean, z_std),
            "semantic": (sem_prior, semantic_gain * response((sem_prior @ sem_weights.T) * sem_scale), ventral_zyx, p_mean, p_std),
        }.items():
            with atomic_output(out / oracle_key(s, target)) as tmp, open(tmp, "wb") as f:
                np.savez(f, prior_s=prior.astype(np.float32), prior_response=prior_response.astype(np.float32),
                         voxel_ijk=np.argwhere(zyx)[:, ::-1].astype(np.int32), z_mean=mean, z_std=std,
                         gain=gain, noise_sd=noise_sd)
        meta["subjects"][subject_label(s)] = {"roi_voxels": n_vox, "ventral_voxels": int(in_ventral.sum()),
                                              "trials": int(ids.size)}
        log.info("%s: %d ROI voxels, %d ventral voxels, %d trials", subject_label(s), n_vox, in_ventral.sum(), ids.size)
    with atomic_output(out / META) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, default=str))
    return meta
