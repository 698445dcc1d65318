"""COCO captions of the NSD images: download COCO's annotation zip, read its caption files, table them by nsd id.

The mapping. The row index of ``nsd_stim_info_merged.csv`` is the 0-based NSD id (it equals the CSV's
``nsdId`` column and the row of ``imgBrick``; NSD data manual, https://cvnlab.slite.page/p/CT9Fwl4_hc/NSD-Data-Manual).
Its ``cocoId`` and ``cocoSplit`` (``train2017`` or ``val2017``) locate the image in COCO 2017; that image's
captions are the ``annotations`` of ``captions_<split>.json`` whose ``image_id`` is the ``cocoId``, usually 5
per image, a few with 6 or 7. ``caption_index`` numbers an image's captions 0, 1, ... in ascending COCO
annotation ``id``, so it does not depend on the order of the JSON file. Captions are stripped of the leading and
trailing whitespace and newlines some of them carry. Peers get the same captions with pycocotools,
``COCO(file).loadAnns(COCO(file).getAnnIds(imgIds=[cocoId]))``, e.g. ``read_image_coco_info`` of
tknapen/nsd_access (https://github.com/tknapen/nsd_access), whose ``download_coco_annotation_file`` fetches the
same zip.

The caption files are not in NSD's bucket: they are members of COCO's ``annotations_trainval2017.zip``
(https://cocodataset.org/#download). Only the two caption members are ever read; the instances and keypoints
files beside them are not.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from .common import BraidError, atomic_output

log = logging.getLogger(__name__)

COCO_ANNOTATIONS_URL = "http://images.cocodataset.org/annotations/annotations_trainval2017.zip"
# The size the server reports for COCO_ANNOTATIONS_URL (Content-Length), for documentation and as
# ``expected_size``; a download is always checked against the total the server reports.
COCO_ANNOTATIONS_SIZE = 252_907_541
ANNOTATIONS_ZIP = "annotations_trainval2017.zip"
CAPTION_MEMBERS = {"train2017": "annotations/captions_train2017.json", "val2017": "annotations/captions_val2017.json"}
COLUMNS = ["nsd_id", "coco_id", "coco_split", "caption_index", "caption"]
CHUNK = 1 << 20  # bytes per read when downloading or checking CRCs


# Reading the caption files ---------------------------------------------------------------------------------------

def read_captions(source: str | os.PathLike) -> dict[str, pd.DataFrame]:
    """Split -> DataFrame(coco_id int64, annotation_id int64, caption str stripped) from ``source``.

    ``source``: COCO's annotation zip (only the two caption members are read, streamed from the zip), or a
    folder holding ``captions_train2017.json`` and ``captions_val2017.json`` directly, under ``annotations/``,
    or holding ``annotations_trainval2017.zip``. Each DataFrame's ``attrs["source"]`` names the file it came from.
    """
    source = Path(source)
    if source.is_file():
        return _read_zip(source)
    if not source.is_dir():
        raise BraidError(f"{source}: no such file or folder; give COCO's {ANNOTATIONS_ZIP} or a folder holding "
                         f"its caption files")
    names = [Path(m).name for m in CAPTION_MEMBERS.values()]
    for folder in (source, source / "annotations"):
        if all((folder / n).is_file() for n in names):
            return {split: _read_json(folder / Path(m).name) for split, m in CAPTION_MEMBERS.items()}
    if (source / ANNOTATIONS_ZIP).is_file():
        return _read_zip(source / ANNOTATIONS_ZIP)
    raise BraidError(f"{source}: holds neither {' and '.join(names)} (directly or under annotations/) nor "
                     f"{ANNOTATIONS_ZIP}; download {COCO_ANNOTATIONS_URL} there, or rerun the captions_fetch rule")


def _read_zip(path: Path) -> dict[str, pd.DataFrame]:
    """The caption members of the annotation zip ``path``; no other member is opened."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            out = {}
            for split, member in CAPTION_MEMBERS.items():
                if member not in names:
                    raise BraidError(f"{path}: has no member {member}; is it COCO's {ANNOTATIONS_ZIP}? Delete it "
                                     f"and rerun the captions_fetch rule, which downloads {COCO_ANNOTATIONS_URL}")
                with zf.open(member) as fh:
                    out[split] = _parse(fh, f"{path}!{member}")
            return out
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise BraidError(_corrupt_zip(path, err)) from None


def _corrupt_zip(path, err) -> str:
    return (f"{path}: truncated or corrupt zip ({err}); delete it and rerun the captions_fetch rule, which downloads it "
            f"again (an interrupted download resumes from its .part file)")


def _read_json(path: Path) -> pd.DataFrame:
    with open(path, "rb") as fh:
        return _parse(fh, str(path))


def _parse(fh, name: str) -> pd.DataFrame:
    """One COCO caption file (a binary file object) -> DataFrame; ``name`` is what errors call it."""
    try:
        data = json.load(fh)
    except json.JSONDecodeError as err:
        raise BraidError(f"{name}: not valid JSON at line {err.lineno}, column {err.colno} ({err.msg}); the file is "
                         f"damaged: delete it (or the zip it came from) and rerun the captions_fetch rule") from None
    except UnicodeDecodeError as err:
        raise BraidError(f"{name}: not UTF-8 JSON ({err}); delete it and rerun the captions_fetch rule") from None
    anns = data.get("annotations") if isinstance(data, dict) else None
    if not isinstance(anns, list):
        raise BraidError(f"{name}: no 'annotations' list; is this a COCO captions file (captions_*2017.json)?")
    try:
        coco_id = np.fromiter((a["image_id"] for a in anns), np.int64, len(anns))
        ann_id = np.fromiter((a["id"] for a in anns), np.int64, len(anns))
        caption = [a["caption"].strip() for a in anns]
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise BraidError(f"{name}: an annotation lacks an integer 'image_id'/'id' or a string 'caption' ({err!r}); "
                         f"is this a COCO captions file?") from None
    df = pd.DataFrame({"coco_id": coco_id, "annotation_id": ann_id, "caption": pd.Series(caption, dtype=str)})
    df.attrs["source"] = name
    return df


# The table -------------------------------------------------------------------------------------------------------

def caption_table(stim_info: pd.DataFrame, captions: dict[str, pd.DataFrame], nsd_ids=None) -> pd.DataFrame:
    """One row per caption (:data:`COLUMNS`) of each NSD image in ``nsd_ids`` (default: every row of ``stim_info``).

    ``stim_info``: ``nsd_stim_info_merged.csv`` (index = 0-based nsd id; ``cocoId``, ``cocoSplit``);
    ``captions``: :func:`read_captions`. Sorted by nsd_id, then caption_index (0.. in ascending annotation id).
    dtypes: nsd_id, coco_id, caption_index int64; coco_split, caption str. Every image must have a caption.
    """
    for col in ("cocoId", "cocoSplit"):
        if col not in stim_info.columns:
            raise BraidError(f"stim info has no '{col}' column; is this nsd_stim_info_merged.csv?")
    if "nsdId" in stim_info.columns:
        differ = np.flatnonzero(stim_info["nsdId"].to_numpy() != stim_info.index.to_numpy())
        if len(differ):
            raise BraidError(f"stim info: nsdId differs from the row index at row {stim_info.index[differ[0]]}; "
                             f"is this NSD's nsd_stim_info_merged.csv, read with index_col=0?")
    sel = stim_info
    if nsd_ids is not None:
        ids = np.unique(np.asarray(nsd_ids, dtype=np.int64))
        unknown = ids[~np.isin(ids, stim_info.index.to_numpy())]
        if len(unknown):
            raise BraidError(f"{len(unknown)} nsd id(s) not in the stim info, e.g. {unknown[:5].tolist()}; NSD ids "
                             f"are 0-based rows of nsd_stim_info_merged.csv")
        sel = stim_info.loc[ids]
    images = pd.DataFrame({"nsd_id": sel.index.to_numpy(np.int64), "coco_id": sel["cocoId"].to_numpy(np.int64),
                           "coco_split": sel["cocoSplit"].astype(str).to_numpy()})
    bad = ~images["coco_split"].isin(list(CAPTION_MEMBERS))
    if bad.any():
        raise BraidError(f"stim info: {int(bad.sum())} image(s) with a cocoSplit other than "
                         f"{'/'.join(CAPTION_MEMBERS)}: {_examples(images[bad])}")
    parts, missing = [], []
    for split, imgs in images.groupby("coco_split", sort=True):
        if split not in captions:
            raise BraidError(f"no {split} captions were read (got {sorted(captions)}), but {len(imgs)} NSD "
                             f"image(s) are in {split}, e.g. {_examples(imgs)}")
        anns = captions[split]
        anns = anns[anns["coco_id"].isin(imgs["coco_id"])].sort_values(["coco_id", "annotation_id"], kind="stable")
        anns = anns.assign(caption_index=anns.groupby("coco_id", sort=False).cumcount().astype(np.int64))
        absent = ~imgs["coco_id"].isin(anns["coco_id"])
        if absent.any():
            missing.append((imgs[absent], captions[split].attrs.get("source", f"{split} captions")))
        parts.append(imgs.merge(anns[["coco_id", "caption_index", "caption"]], on="coco_id", how="inner"))
    if missing:
        count = sum(len(m) for m, _ in missing)
        where = "; ".join(f"{_examples(m)} (source {src})" for m, src in missing)
        raise BraidError(f"{count} NSD image(s) have no caption in their COCO split: {where}; is the caption source "
                         f"COCO 2017's {ANNOTATIONS_ZIP}, complete?")
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=t) for c, t in zip(COLUMNS, [np.int64, np.int64, str, np.int64, str])})
    table = pd.concat(parts, ignore_index=True).sort_values(["nsd_id", "caption_index"], kind="stable")
    return table[COLUMNS].reset_index(drop=True)


def _examples(images: pd.DataFrame, n: int = 5) -> str:
    """'nsd 3 (cocoId 42, val2017), ...' for the first ``n`` rows of ``images``."""
    shown = ", ".join(f"nsd {r.nsd_id} (cocoId {r.coco_id}, {r.coco_split})" for r in images.head(n).itertuples())
    return shown + (f" and {len(images) - n} more" if len(images) > n else "")


def write_table(table: pd.DataFrame, out_path: str | os.PathLike) -> None:
    """Write ``table`` as parquet at ``out_path``, atomically."""
    with atomic_output(out_path) as tmp:
        table.to_parquet(tmp, index=False)


def build_caption_table(stim_info_path: str | os.PathLike, source: str | os.PathLike,
                        out_path: str | os.PathLike) -> pd.DataFrame:
    """The whole step: read the stim info and the captions, table them for every NSD image, write parquet."""
    from .nsd import load_stim_info

    stim_info = load_stim_info(stim_info_path)
    captions = read_captions(source)
    log.info("read %s", ", ".join(f"{len(df)} {split} captions" for split, df in captions.items()))
    table = caption_table(stim_info, captions)
    per_image = table.groupby("nsd_id").size()
    log.info("%d NSD images, %d captions, %d to %d per image", len(per_image), len(table),
             per_image.min() if len(per_image) else 0, per_image.max() if len(per_image) else 0)
    write_table(table, out_path)
    log.info("wrote %s", out_path)
    return table


# Downloading the zip ---------------------------------------------------------------------------------------------

class _Interrupted(Exception):
    """The transfer stopped before the server's total; the .part file holds what came."""


def download_annotations(url: str, dest: str | os.PathLike, expected_size: int | None = None, timeout: float = 60,
                         attempts: int = 3) -> Path:
    """Download ``url`` to ``dest`` via ``dest.part``, resuming a partial ``.part``; return ``dest``.

    The size must equal the total the server reports (and ``expected_size`` when given), and the caption members'
    CRCs must check (:func:`check_caption_zip`) before ``dest`` appears. A transfer that breaks off resumes, up to
    ``attempts`` times in all; a rerun resumes too.
    """
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, attempts + 1):
        try:
            _fetch(url, part, expected_size, timeout)
            break
        except _Interrupted as err:
            if attempt == attempts:
                raise BraidError(f"{url}: download interrupted ({err}) after {attempts} attempt(s); {_NETWORK}") \
                    from None
            log.warning("%s: download interrupted (%s); resuming (attempt %d of %d)", url, err, attempt + 1, attempts)
    try:
        _read_members_through(part)
    except (zipfile.BadZipFile, zlib.error, EOFError, KeyError) as err:
        part.unlink(missing_ok=True)
        raise BraidError(f"{url}: the download is not COCO's annotation zip with intact caption members ({err}); "
                         f"deleted {part}; rerun the captions_fetch rule to download it again") from None
    os.replace(part, dest)
    return dest


_NETWORK = ("the captions_fetch rule runs on the submit host because it needs the network; check the connection there "
            "and rerun (the download resumes from its .part file)")


def _fetch(url: str, part: Path, expected_size: int | None, timeout: float) -> None:
    """One GET of the rest of ``url`` into ``part``; raises :class:`_Interrupted` when it stops short."""
    from .progress import progress

    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "braid", "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # nothing left to send: complete, or a part larger than the file
            total = _range_total(err.headers.get("Content-Range"))
            if total == have:
                _check_total(url, total, expected_size)
                return
            part.unlink()
            raise _Interrupted(f"the server refused the range from {have} (file of {total} bytes); restarting")
        raise BraidError(f"{url}: HTTP {err.code} {err.reason}; check the URL, then rerun the captions_fetch rule") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
        raise BraidError(f"{url}: cannot connect ({getattr(err, 'reason', err)}); {_NETWORK}") from None
    with resp:
        if resp.status == 206:
            content_range = resp.headers.get("Content-Range")
            start, total = _range_start(content_range), _range_total(content_range)
            if start != have:
                part.unlink()
                raise _Interrupted(f"the server resumed at byte {start}, not {have}; restarting")
        else:  # 200: the whole file (a server that ignores Range restarts us from 0)
            if have:
                log.info("%s: the server ignored the range request; downloading from the start", url)
            have = 0
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        _check_total(url, total, expected_size)
        total = total if total is not None else expected_size
        with open(part, "ab" if have else "wb") as fh, \
                progress(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                         desc=f"download {part.name[:-5]}", logger=log) as bar:
            try:
                while chunk := resp.read(CHUNK):
                    fh.write(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as err:
                raise _Interrupted(f"{err!r} at byte {bar.n}") from None
    size = part.stat().st_size
    if total is not None and size < total:
        raise _Interrupted(f"{size} of {total} bytes")
    if total is not None and size > total:
        part.unlink()
        raise BraidError(f"{url}: got {size} bytes, more than the {total} the server reports; deleted the partial "
                         f"file, rerun the captions_fetch rule")


def _check_total(url: str, total: int | None, expected_size: int | None) -> None:
    if expected_size is not None and total is not None and total != expected_size:
        raise BraidError(f"{url}: the server reports {total} bytes, expected {expected_size}; the file on the server "
                         f"changed or the URL is wrong: check it (COCO_ANNOTATIONS_SIZE documents the known size)")


_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)")


def _range_start(header: str | None) -> int | None:
    m = _CONTENT_RANGE.match(header or "")
    return int(m.group(1)) if m and m.group(1) else None


def _range_total(header: str | None) -> int | None:
    m = _CONTENT_RANGE.match(header or "")
    return int(m.group(2)) if m and m.group(2) != "*" else None


def check_caption_zip(path: str | os.PathLike) -> None:
    """Read the two caption members of the zip ``path`` through, checking their CRCs; BraidError if bad."""
    try:
        _read_members_through(path)
    except KeyError as err:
        raise BraidError(f"{path}: has no member {err}; is it COCO's {ANNOTATIONS_ZIP}? Delete it and rerun the "
                         f"captions_fetch rule") from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as err:
        raise BraidError(_corrupt_zip(path, err)) from None


def _read_members_through(path) -> None:
    """Read the caption members of the zip ``path`` in chunks (zipfile checks each CRC at its end)."""
    with zipfile.ZipFile(path) as zf:
        for member in CAPTION_MEMBERS.values():
            with zf.open(member) as fh:  # KeyError when missing
                while fh.read(CHUNK):
                    pass
