"""COCO captions of NSD images: the table against an independent reader, the sources, errors, and the download
from a real HTTP server on loopback (ranges, dropped connections, a server that ignores ranges)."""

from __future__ import annotations

import io
import json
import logging
import re
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pandas as pd
import pytest

from braid import captions
from braid.common import BraidError

# (annotation id, image id, caption): ids out of order, padded captions, a 6- and a 7-caption image
TRAIN = [
    (57, 101, "  A cat sits on a mat.\n"), (12, 101, "A cat on a rug."), (90, 101, "\nThe cat is sleeping. "),
    (33, 101, "Cat."), (71, 101, "A small grey cat."),
    (5, 100, "A red bus."), (3, 100, " Bus on a street."), (8, 100, "A bus.\n"), (1, 100, "Red bus parked."),
    (9, 100, "A double-decker bus."),
    (45, 102, "Two dogs."), (40, 102, "Dogs play."), (44, 102, "Dogs in a park."), (41, 102, "A pair of dogs."),
    (43, 102, "Dogs run on grass."), (42, 102, "  Brown dogs.  "),
    (200, 200, "A distractor train image."), (201, 200, "Not in NSD."),
]
VAL = [
    (7, 500, "A plate of food."), (2, 500, "Food on a plate.\n"), (6, 500, "Dinner."), (4, 500, "A meal."),
    (3, 500, "Pasta on a plate."),
    (19, 502, "A kite."), (11, 502, "Kite in the sky."), (15, 502, "A kite flying."), (12, 502, "A red kite."),
    (17, 502, "Kite above a beach."), (13, 502, "Someone flies a kite."), (14, 502, " Kites. "),
    (30, 100, "WRONG SPLIT: val image 100 is not train image 100."), (31, 501, "A val distractor."),
]
# NSD rows (0-based nsd id = row): cocoId, cocoSplit
STIM = [(101, "train2017"), (500, "val2017"), (100, "train2017"), (102, "train2017"), (502, "val2017")]


def coco_json(anns, extra_images=()) -> dict:
    ids = sorted({i for _, i, _ in anns} | set(extra_images))
    return {"info": {"description": "test"}, "licenses": [],
            "images": [{"id": i, "file_name": f"{i:012d}.jpg", "height": 480, "width": 640} for i in ids],
            "annotations": [{"image_id": i, "id": a, "caption": c} for a, i, c in anns]}


def write_stim(path, stim=STIM):
    n = len(stim)
    pd.DataFrame({"cocoId": [c for c, _ in stim], "cocoSplit": [s for _, s in stim],
                  "cropBox": ["(0, 0, 0.1, 0.1)"] * n, "loss": [0.0] * n, "nsdId": list(range(n)),
                  "flagged": [False] * n, "BOLD5000": [False] * n, "shared1000": [i % 2 == 0 for i in range(n)],
                  "subject1": [1] * n}).to_csv(path)
    return path


@pytest.fixture()
def coco(tmp_path):
    """COCO-format caption files in tmp_path/json and NSD's stim info CSV; returns (csv, {split: json path})."""
    folder = tmp_path / "json"
    folder.mkdir()
    paths = {"train2017": folder / "captions_train2017.json", "val2017": folder / "captions_val2017.json"}
    paths["train2017"].write_text(json.dumps(coco_json(TRAIN, extra_images=[201]), indent=1))
    paths["val2017"].write_text(json.dumps(coco_json(VAL)))
    return write_stim(tmp_path / "nsd_stim_info_merged.csv"), paths


def expected_rows(csv_path, json_paths) -> list[tuple]:
    """The independent reader: plain json and dicts, like pycocotools' imgToAnns, ordered by annotation id."""
    by_image: dict[tuple, list] = {}
    for split, path in json_paths.items():
        with open(path) as fh:
            for ann in json.load(fh)["annotations"]:
                by_image.setdefault((split, ann["image_id"]), []).append((ann["id"], ann["caption"].strip()))
    stim = pd.read_csv(csv_path, index_col=0)
    rows = []
    for nsd_id in range(len(stim)):
        coco_id, split = int(stim["cocoId"].iloc[nsd_id]), stim["cocoSplit"].iloc[nsd_id]
        for k, (_, caption) in enumerate(sorted(by_image[(split, coco_id)])):
            rows.append((nsd_id, coco_id, split, k, caption))
    return rows


def rows(table) -> list[tuple]:
    return [tuple(r) for r in table[captions.COLUMNS].itertuples(index=False)]


def make_zip(path, json_paths, compression=zipfile.ZIP_DEFLATED, others=True):
    """COCO's zip layout; ``others`` adds a corrupt instances member (bad CRC, not JSON) that must never be read."""
    poison = b'{"this member": "must not be read" ' + b"x" * 2000
    with zipfile.ZipFile(path, "w", compression) as zf:
        if others:
            zf.writestr(zipfile.ZipInfo("annotations/instances_train2017.json"), poison)  # stored
        for split, member in captions.CAPTION_MEMBERS.items():
            zf.write(json_paths[split], member)
        if others:
            zf.writestr("annotations/person_keypoints_val2017.json", b"{}")
    if others:
        raw = path.read_bytes()
        assert raw.count(poison) == 1
        path.write_bytes(raw.replace(poison, poison.replace(b"x", b"y")))  # same length, wrong CRC
    return path


# the table --------------------------------------------------------------------------------------------------------

def test_table_matches_an_independent_reader(coco):
    csv, paths = coco
    table = captions.caption_table(pd.read_csv(csv, index_col=0), captions.read_captions(paths["train2017"].parent))
    assert rows(table) == expected_rows(csv, paths)
    assert list(table.columns) == captions.COLUMNS
    assert table.groupby("nsd_id").size().tolist() == [5, 5, 5, 6, 7]
    # pinned by hand: nsd 0 = train 101, ordered by annotation id 12, 33, 57, 71, 90, stripped
    assert table.loc[table.nsd_id == 0, "caption"].tolist() == [
        "A cat on a rug.", "Cat.", "A cat sits on a mat.", "A small grey cat.", "The cat is sleeping."]
    assert table.loc[table.nsd_id == 2, "caption"].tolist()[0] == "Red bus parked."  # train 100, not val 100
    assert not table.caption.str.contains("WRONG SPLIT|distractor|Not in NSD").any()
    assert str(table.nsd_id.dtype) == str(table.coco_id.dtype) == str(table.caption_index.dtype) == "int64"
    assert all(isinstance(v, str) for v in table.caption) and all(isinstance(v, str) for v in table.coco_split)


def test_zip_and_both_folder_layouts_give_the_same_table(coco, tmp_path):
    csv, paths = coco
    stim = pd.read_csv(csv, index_col=0)
    nested = tmp_path / "nested" / "annotations"
    nested.mkdir(parents=True)
    for split, path in paths.items():
        (nested / path.name).write_bytes(path.read_bytes())
    holder = tmp_path / "holder"
    holder.mkdir()
    zip_path = make_zip(holder / captions.ANNOTATIONS_ZIP, paths)
    want = expected_rows(csv, paths)
    for source in (paths["val2017"].parent, nested.parent, holder, zip_path):
        got = captions.read_captions(source)
        assert sorted(got) == ["train2017", "val2017"]
        assert str(source) in got["train2017"].attrs["source"]
        assert rows(captions.caption_table(stim, got)) == want, source


def test_zip_reader_never_reads_other_members(coco, tmp_path):
    csv, paths = coco
    zip_path = make_zip(tmp_path / "a.zip", paths)
    with zipfile.ZipFile(zip_path) as zf, pytest.raises(zipfile.BadZipFile, match="CRC"):
        zf.read("annotations/instances_train2017.json")  # reading it at all would fail
    got = captions.read_captions(zip_path)
    captions.check_caption_zip(zip_path)
    assert rows(captions.caption_table(pd.read_csv(csv, index_col=0), got)) == expected_rows(csv, paths)


def test_nsd_ids_select_images(coco):
    csv, paths = coco
    stim, caps = pd.read_csv(csv, index_col=0), captions.read_captions(paths["val2017"].parent)
    table = captions.caption_table(stim, caps, nsd_ids=[4, 1, 4])
    assert rows(table) == [r for r in expected_rows(csv, paths) if r[0] in (1, 4)]
    with pytest.raises(BraidError, match=r"not in the stim info.*\[5\]"):
        captions.caption_table(stim, caps, nsd_ids=[1, 5])


def test_build_caption_table_writes_parquet_and_logs_counts(coco, tmp_path, caplog):
    csv, paths = coco
    out = tmp_path / "out" / "nsd_captions.parquet"
    with caplog.at_level(logging.INFO, logger="braid.captions"):
        table = captions.build_caption_table(csv, paths["val2017"].parent, out)
    back = pd.read_parquet(out)
    assert rows(back) == rows(table) == expected_rows(csv, paths)
    assert str(back.caption_index.dtype) == "int64"
    assert "5 NSD images, 28 captions, 5 to 7 per image" in caplog.text
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary left


# errors -----------------------------------------------------------------------------------------------------------

def test_missing_caption_names_the_nsd_id_and_source(coco, tmp_path):
    csv, paths = coco
    stim = pd.read_csv(write_stim(tmp_path / "s.csv", STIM + [(999, "train2017"), (501, "train2017")]), index_col=0)
    with pytest.raises(BraidError) as err:
        captions.caption_table(stim, captions.read_captions(paths["val2017"].parent))
    msg = str(err.value)
    assert msg.startswith("2 NSD image(s) have no caption")
    assert "nsd 5 (cocoId 999, train2017)" in msg and "nsd 6 (cocoId 501, train2017)" in msg
    assert str(paths["train2017"]) in msg


def test_bad_split_or_columns_are_refused(coco, tmp_path):
    csv, paths = coco
    caps = captions.read_captions(paths["val2017"].parent)
    stim = pd.read_csv(write_stim(tmp_path / "s.csv", STIM[:2] + [(7, "test2015")]), index_col=0)
    with pytest.raises(BraidError, match=r"cocoSplit other than train2017/val2017: nsd 2 \(cocoId 7, test2015\)"):
        captions.caption_table(stim, caps)
    with pytest.raises(BraidError, match="no 'cocoSplit' column"):
        captions.caption_table(stim.drop(columns="cocoSplit"), caps)
    with pytest.raises(BraidError, match="no val2017 captions were read"):
        captions.caption_table(pd.read_csv(csv, index_col=0), {"train2017": caps["train2017"]})


def test_json_errors_name_the_file_and_line(coco, tmp_path):
    _, paths = coco
    paths["val2017"].write_text('{\n "images": [],\n "annotations": [\n  {"id": 1,, }\n ]\n}\n')
    with pytest.raises(BraidError, match=re.escape(str(paths["val2017"])) + r": not valid JSON at line 4, column"):
        captions.read_captions(paths["val2017"].parent)
    paths["val2017"].write_text('{"images": []}')
    with pytest.raises(BraidError, match=re.escape(str(paths["val2017"])) + r": no 'annotations' list"):
        captions.read_captions(paths["val2017"].parent)
    paths["val2017"].write_text('{"annotations": [{"image_id": 1, "caption": "no id"}]}')
    with pytest.raises(BraidError, match="lacks an integer 'image_id'/'id'"):
        captions.read_captions(paths["val2017"].parent)


def test_folder_without_caption_files_is_refused(coco, tmp_path):
    _, paths = coco
    with pytest.raises(BraidError, match=re.escape(str(tmp_path / "nothing")) + ": no such file or folder"):
        captions.read_captions(tmp_path / "nothing")
    paths["train2017"].unlink()  # val alone is not enough
    with pytest.raises(BraidError, match=re.escape(str(paths["val2017"].parent)) + ": holds neither"):
        captions.read_captions(paths["val2017"].parent)


def test_damaged_zips_are_named_with_what_to_do(coco, tmp_path):
    _, paths = coco
    good = make_zip(tmp_path / "good.zip", paths).read_bytes()
    cut = tmp_path / "cut.zip"
    cut.write_bytes(good[:-300])
    with pytest.raises(BraidError, match=re.escape(str(cut)) + r": truncated or corrupt zip.*delete it and rerun"):
        captions.read_captions(cut)
    with pytest.raises(BraidError, match=re.escape(str(cut)) + r": truncated or corrupt zip"):
        captions.check_caption_zip(cut)
    # a caption member whose bytes changed: the CRC check while reading it
    stored = make_zip(tmp_path / "stored.zip", paths, zipfile.ZIP_STORED, others=False).read_bytes()
    assert stored.count(b"A kite flying.") == 1
    bad = tmp_path / "bad.zip"
    bad.write_bytes(stored.replace(b"A kite flying.", b"A kite frying."))
    with pytest.raises(BraidError, match=re.escape(str(bad)) + r": truncated or corrupt zip \(Bad CRC-32"):
        captions.read_captions(bad)
    with pytest.raises(BraidError, match="Bad CRC-32"):
        captions.check_caption_zip(bad)
    lacking = tmp_path / "lacking.zip"
    with zipfile.ZipFile(lacking, "w") as zf:
        zf.write(paths["train2017"], captions.CAPTION_MEMBERS["train2017"])
    with pytest.raises(BraidError, match=r"lacking.zip: has no member annotations/captions_val2017.json"):
        captions.read_captions(lacking)


# the download -----------------------------------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    """Serves ``server.payload``; honours ``Range: bytes=N-`` unless ``server.ignore_range``; with ``server.drop``
    set, the next response stops after that many bytes and the connection closes. Records (start, bytes sent)."""

    def do_GET(self):
        srv = self.server
        data, start = srv.payload, 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if match and not srv.ignore_range:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                srv.served.append((start, 0))
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if srv.drop is not None:
            body, srv.drop = body[:srv.drop], None
        srv.served.append((start, len(body)))  # before writing: the client may finish before this thread goes on
        self.wfile.write(body)
        self.wfile.flush()

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.payload, srv.ignore_range, srv.drop, srv.served = b"", False, None, []
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/annotations/{captions.ANNOTATIONS_ZIP}"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def payload_zip(paths, corrupt=False) -> bytes:
    """A COCO-layout zip of about 300 kB (a stored filler member), optionally with a caption member's CRC broken."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("annotations/instances_train2017.json", bytes(range(256)) * 1200)
        for split, member in captions.CAPTION_MEMBERS.items():
            zf.write(paths[split], member)
    data = buf.getvalue()
    return data.replace(b"A kite flying.", b"A kite frying.") if corrupt else data


def test_download_resumes_after_a_dropped_connection(coco, server, tmp_path):
    _, paths = coco
    server.payload = payload_zip(paths)
    total, half = len(server.payload), len(server.payload) // 2
    server.drop = half
    dest = tmp_path / "dl" / captions.ANNOTATIONS_ZIP
    assert captions.download_annotations(server.url, dest, expected_size=total) == dest
    assert server.served == [(0, half), (half, total - half)]  # the second request asked only for the rest
    assert dest.read_bytes() == server.payload
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]


def test_interrupted_download_keeps_its_part_and_a_rerun_resumes(coco, server, tmp_path):
    _, paths = coco
    server.payload = payload_zip(paths)
    total = len(server.payload)
    server.drop = 1000
    dest = tmp_path / captions.ANNOTATIONS_ZIP
    with pytest.raises(BraidError, match=r"download interrupted \(1000 of \d+ bytes\).*submit host.*resumes"):
        captions.download_annotations(server.url, dest, attempts=1)
    assert not dest.exists() and (tmp_path / f"{dest.name}.part").stat().st_size == 1000
    captions.download_annotations(server.url, dest, attempts=1)
    assert server.served == [(0, 1000), (1000, total - 1000)]
    assert dest.read_bytes() == server.payload and not (tmp_path / f"{dest.name}.part").exists()


def test_a_complete_part_file_is_checked_and_renamed(coco, server, tmp_path):
    _, paths = coco
    server.payload = payload_zip(paths)
    dest = tmp_path / captions.ANNOTATIONS_ZIP
    (tmp_path / f"{dest.name}.part").write_bytes(server.payload)  # a run that died before the rename
    captions.download_annotations(server.url, dest)
    assert server.served == [(len(server.payload), 0)]  # 416: nothing left to send
    assert dest.read_bytes() == server.payload


def test_a_server_ignoring_range_restarts_from_zero(coco, server, tmp_path):
    _, paths = coco
    server.payload, server.ignore_range = payload_zip(paths), True
    dest = tmp_path / captions.ANNOTATIONS_ZIP
    (tmp_path / f"{dest.name}.part").write_bytes(b"junk from an older run" * 50)
    captions.download_annotations(server.url, dest)
    assert server.served == [(0, len(server.payload))]
    assert dest.read_bytes() == server.payload
    captions.read_captions(dest)


def test_a_size_mismatch_raises_and_leaves_no_dest(coco, server, tmp_path):
    _, paths = coco
    server.payload = payload_zip(paths)
    total = len(server.payload)
    dest = tmp_path / captions.ANNOTATIONS_ZIP
    with pytest.raises(BraidError, match=rf"reports {total} bytes, expected {total + 1}"):
        captions.download_annotations(server.url, dest, expected_size=total + 1)
    assert not dest.exists()


def test_a_corrupt_zip_is_refused_and_deleted(coco, server, tmp_path):
    _, paths = coco
    server.payload = payload_zip(paths, corrupt=True)
    dest = tmp_path / "dl" / captions.ANNOTATIONS_ZIP
    with pytest.raises(BraidError, match=r"not COCO's annotation zip with intact caption members \(Bad CRC-32"):
        captions.download_annotations(server.url, dest)
    assert list(dest.parent.iterdir()) == []
    server.payload = b"<html>not a zip</html>"
    with pytest.raises(BraidError, match="not COCO's annotation zip"):
        captions.download_annotations(server.url, dest)
    assert list(dest.parent.iterdir()) == []


def test_network_errors_name_the_url_and_the_submit_host(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nobody listens there
    url = f"http://127.0.0.1:{port}/a.zip"
    with pytest.raises(BraidError, match=re.escape(url) + r": cannot connect.*submit host.*resumes"):
        captions.download_annotations(url, tmp_path / "a.zip", timeout=5)
    assert list(tmp_path.iterdir()) == []
