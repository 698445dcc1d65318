"""Benchmark: the COCO caption table of the NSD images, BRAID's vectorised build vs the peers' per-image loop.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/captions_table.py [--images 73000] [--source zip|folder]

Generates, in a temporary folder, COCO-format caption files the size of COCO 2017's (train2017: 118,287 images,
val2017: 5,000, scaled with ``--images``; 5 captions per image, 0.3 % with 6 and 0.05 % with 7, ~50 characters,
annotation ids shuffled; the real files are 91 MB and 4 MB), zipped as in ``annotations_trainval2017.zip``
(``--source zip``, deflate level 1) or as plain files, and an NSD stim-info CSV of ``--images`` rows (90 %
train2017, 10 % val2017 but at most 90 % of the val images: 4,500 of 73,000). Both ways read the same source and
stim info, build the same table and write it as parquet; the script checks the tables are equal.

  peers  json.load of each caption file, a pycocotools-style ``imgToAnns`` dict per split (what
         ``COCO(file).getAnnIds(imgIds=[cocoId])`` looks up), then a Python loop over the NSD images appending
         one row per caption (sorted by annotation id, stripped), then a DataFrame                <- baseline
  braid  braid.captions.build_caption_table: read_captions (json.load, columns by comprehension),
         caption_table (per-split filter, sort, cumcount, merge), write_table

Prints seconds for each, the ratio, and BRAID's split into reading and tabling. The issue's goal: the table for
73,000 images in under 30 s on one core.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd

COCO_IMAGES = {"train2017": 118_287, "val2017": 5_000}
NSD_IMAGES = 73_000
WORDS = ("a man woman dog cat bus train plate table street kitchen people group of on in with near the sitting "
         "standing red blue white large small two three next to front parked riding holding field grass water "
         "sky building food pizza bowl bed room laptop phone player tennis baseball snow beach").split()


def caption(rng: random.Random) -> str:
    words = rng.choices(WORDS, k=rng.randint(7, 12))
    text = " ".join(words).capitalize() + "."
    return text if rng.random() > 0.05 else f" {text}\n"  # some COCO captions carry whitespace


def generate(folder: Path, images: int, source: str, seed: int = 0) -> tuple[Path, Path]:
    """COCO-format caption files and a stim-info CSV in ``folder``; returns (stim csv, caption source)."""
    from braid.captions import ANNOTATIONS_ZIP, CAPTION_MEMBERS

    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    scale = images / NSD_IMAGES
    counts = {s: max(2, round(n * scale)) for s, n in COCO_IMAGES.items()}
    n_val = min(round(0.10 * images), int(0.9 * counts["val2017"]))
    n_nsd = {"train2017": images - n_val, "val2017": n_val}
    next_id = iter(nrng.permutation(10 * sum(counts.values()) * 8) + 1)  # unique annotation ids, shuffled
    image_ids = nrng.choice(600_000, size=sum(counts.values()), replace=False) + 1  # COCO ids are < 600,000
    stim, texts, start = [], {}, 0
    for split, n in counts.items():
        ids = image_ids[start:start + n]
        start += n
        per = nrng.choice([5, 6, 7], size=n, p=[0.9965, 0.003, 0.0005])
        anns = [{"image_id": int(i), "id": int(next(next_id)), "caption": caption(rng)}
                for i, k in zip(ids, per) for _ in range(k)]
        rng.shuffle(anns)
        imgs = [{"license": 3, "file_name": f"{i:012d}.jpg", "coco_url": f"http://images.cocodataset.org/{split}/"
                 f"{i:012d}.jpg", "height": 480, "width": 640, "date_captured": "2013-11-14 16:28:13",
                 "flickr_url": f"http://farm4.staticflickr.com/3153/{i}_c4a5b3b2f1_z.jpg", "id": int(i)} for i in ids]
        texts[CAPTION_MEMBERS[split]] = json.dumps({"info": {"description": "synthetic COCO captions"},
                                                    "licenses": [], "images": imgs, "annotations": anns})
        stim += [(int(i), split) for i in nrng.choice(ids, size=n_nsd[split], replace=False)]
    order = nrng.permutation(len(stim))
    stim = [stim[i] for i in order]
    n = len(stim)
    csv = folder / "nsd_stim_info_merged.csv"
    pd.DataFrame({"cocoId": [c for c, _ in stim], "cocoSplit": [s for _, s in stim],
                  "cropBox": ["(0, 0, 0.1671875, 0.1671875)"] * n, "loss": np.zeros(n), "nsdId": np.arange(n),
                  "flagged": np.zeros(n, bool), "BOLD5000": np.zeros(n, bool), "shared1000": np.zeros(n, bool),
                  **{f"subject{s}": np.zeros(n, np.int64) for s in range(1, 9)}}).to_csv(csv)
    if source == "zip":
        out = folder / ANNOTATIONS_ZIP
        with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
            for member, text in texts.items():
                zf.writestr(member, text)
    else:
        out = folder / "annotations"
        out.mkdir()
        for member, text in texts.items():
            (folder / member).write_text(text)
    sizes = ", ".join(f"{Path(m).name} {len(t) / 1e6:.0f} MB" for m, t in texts.items())
    print(f"generated: {images} NSD images ({n_val} val2017), COCO {counts['train2017']} + {counts['val2017']} "
          f"images; {sizes}")
    return csv, out


def peers(csv: Path, source: Path, out: Path) -> pd.DataFrame:
    """The baseline: pycocotools-style imgToAnns per split, then a Python loop per NSD image."""
    from braid.captions import CAPTION_MEMBERS

    stim = pd.read_csv(csv, index_col=0)
    index = {}
    for split, member in CAPTION_MEMBERS.items():
        if source.suffix == ".zip":
            with zipfile.ZipFile(source) as zf, zf.open(member) as fh:
                data = json.load(fh)
        else:
            with open(source.parent / member) as fh:
                data = json.load(fh)
        img_to_anns = defaultdict(list)
        for ann in data["annotations"]:
            img_to_anns[ann["image_id"]].append(ann)
        index[split] = img_to_anns
    rows = []
    for nsd_id, coco_id, split in zip(stim.index, stim["cocoId"], stim["cocoSplit"]):
        anns = sorted(index[split][coco_id], key=lambda a: a["id"])
        for k, ann in enumerate(anns):
            rows.append({"nsd_id": nsd_id, "coco_id": coco_id, "coco_split": split, "caption_index": k,
                         "caption": ann["caption"].strip()})
    table = pd.DataFrame(rows)
    table.to_parquet(out, index=False)
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=NSD_IMAGES, help="NSD images (COCO's sizes scale with it)")
    ap.add_argument("--source", choices=["zip", "folder"], default="zip")
    args = ap.parse_args()

    from braid.captions import build_caption_table, caption_table, read_captions
    from braid.nsd import load_stim_info

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        csv, source = generate(folder, args.images, args.source)
        print(f"generation: {time.perf_counter() - start:.1f} s (not timed below)")

        start = time.perf_counter()
        base = peers(csv, source, folder / "peers.parquet")
        t_peers = time.perf_counter() - start

        start = time.perf_counter()
        table = build_caption_table(csv, source, folder / "braid.parquet")
        t_braid = time.perf_counter() - start

        start = time.perf_counter()
        caps = read_captions(source)
        t_read = time.perf_counter() - start
        stim = load_stim_info(csv)
        start = time.perf_counter()
        caption_table(stim, caps)
        t_table = time.perf_counter() - start

        pd.testing.assert_frame_equal(table, base, check_dtype=False)
        per = table.groupby("nsd_id").size()
        print(f"table: {len(per)} images, {len(table)} captions, {per.min()} to {per.max()} per image; "
              f"equal to the baseline's")
        print(f"{'method':<8}{'seconds':>10}{'x baseline':>12}")
        print(f"{'peers':<8}{t_peers:>10.2f}{1.0:>12.2f}")
        print(f"{'braid':<8}{t_braid:>10.2f}{t_peers / t_braid:>12.2f}")
        print(f"braid split: read_captions {t_read:.2f} s, caption_table {t_table:.2f} s "
              f"(goal: 73,000 images in under 30 s on one core)")


if __name__ == "__main__":
    main()
