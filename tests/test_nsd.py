"""NSD design files (1-based conventions) and fetching from a mirror or a real S3 server on loopback."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from scipy.io import savemat

from braid import nsd, transfer
from braid.common import BraidError


def write_design(path, masterordering, subjectim, sharedix):
    savemat(path, {"masterordering": np.asarray(masterordering)[None, :], "subjectim": np.asarray(subjectim),
                   "sharedix": np.asarray(sharedix)[None, :]})


def test_trial_images_converts_one_based_ids(tmp_path):
    # subject 2 sees 73k ids 11, 12, 13 (1-based) in slots 1..3; trials show slots 3, 1, 3, 2
    subjectim = np.zeros((8, 3), np.int32)
    subjectim[1] = [11, 12, 13]
    write_design(tmp_path / "d.mat", [3, 1, 3, 2], subjectim, [11])
    design = nsd.ExpDesign.load(tmp_path / "d.mat")
    table = design.trial_images(2, [1, 2], trials_per_session=2)
    assert table["nsd_id"].tolist() == [12, 10, 12, 11]  # 0-based
    assert table["session"].tolist() == [1, 1, 2, 2]
    assert table["trial"].tolist() == [1, 2, 1, 2]
    assert table["global_trial"].tolist() == [0, 1, 2, 3]
    assert table["repeat"].tolist() == [0, 0, 1, 0]
    assert table["shared1000"].tolist() == [False, True, False, False]
    # a later session alone keeps its global trial numbers and repeat counts
    late = design.trial_images(2, [2], trials_per_session=2)
    assert late["global_trial"].tolist() == [2, 3] and late["repeat"].tolist() == [1, 0]


def test_shown_ids_are_the_images_the_sessions_show(tmp_path):
    # subject 2's list holds 73k ids 11..16 (1-based); 3 trials per session show slots 3,1,3 | 2,5,1
    subjectim = np.zeros((8, 6), np.int32)
    subjectim[1] = [11, 12, 13, 14, 15, 16]
    write_design(tmp_path / "d.mat", [3, 1, 3, 2, 5, 1, 6, 6, 4], subjectim, [11])
    design = nsd.ExpDesign.load(tmp_path / "d.mat")
    assert design.shown_ids(2, [1], 3).tolist() == [10, 12]  # 0-based, in the list's order
    assert design.shown_ids(2, [2], 3).tolist() == [10, 11, 14]
    assert design.shown_ids(2, [1, 2], 3).tolist() == [10, 11, 12, 14]  # slots 4 and 6 are shown in session 3
    # a pilot of 2 images keeps those shown most often (slots 1 and 3, twice each)
    assert design.shown_ids(2, [1, 2], 3, pilot_images=2).tolist() == [10, 12]
    # ties are broken by the list's order: slot 1 (twice), then slots 2 and 5 (once) -> slot 2
    assert design.shown_ids(2, [2, 3], 3, pilot_images=2).tolist() == [10, 15]
    assert design.shown_ids(2, [2], 3, pilot_images=99).tolist() == [10, 11, 14]


def test_trial_images_errors_name_the_problem(tmp_path):
    subjectim = np.zeros((8, 2), np.int32)
    subjectim[0] = [1, 2]
    write_design(tmp_path / "d.mat", [1, 2], subjectim, [1])
    design = nsd.ExpDesign.load(tmp_path / "d.mat")
    with pytest.raises(BraidError, match="session 2 needs trials 3..4"):
        design.trial_images(1, [2], trials_per_session=2)
    with pytest.raises(BraidError, match="subj03"):
        design.trial_images(3, [1], trials_per_session=2)


def test_corrupt_expdesign_is_a_clear_error(tmp_path):
    bad = tmp_path / "nsd_expdesign.mat"
    bad.write_bytes(b"not a mat file")
    with pytest.raises(BraidError, match="nsd_expdesign.mat"):
        nsd.ExpDesign.load(bad)


def test_keys_match_the_bucket_layout():
    assert nsd.betas_key(1, 3) == "nsddata_betas/ppdata/subj01/func1pt8mm/betas_fithrf_GLMdenoise_RR/betas_session03.hdf5"
    assert nsd.roi_key(8, "nsdgeneral", "func1mm") == "nsddata/ppdata/subj08/func1mm/roi/nsdgeneral.nii.gz"
    with pytest.raises(BraidError, match="outside subj04's NSD sessions 1..30"):
        nsd.check_sessions(4, [30, 31])


def test_stim_info_agrees_with_expdesign(mirror):
    """subjectK_repR holds the 1-based trial numbers at which masterordering shows each image."""
    root, _ = mirror
    design = nsd.ExpDesign.load(root / nsd.EXPDESIGN)
    info = nsd.load_stim_info(root / nsd.STIM_INFO)
    assert list(info.columns[:8]) == ["cocoId", "cocoSplit", "cropBox", "loss", "nsdId", "flagged", "BOLD5000", "shared1000"]
    assert info["shared1000"].sum() == design.sharedix.size
    ids = design.subjectim[0, design.masterordering - 1] - 1
    for trial, nsd_id in enumerate(ids[:20]):
        reps = info.loc[nsd_id, ["subject1_rep0", "subject1_rep1", "subject1_rep2"]].tolist()
        assert trial + 1 in reps
    assert info["subject3_rep0"].eq(0).all()


def test_fetch_from_local_mirror(mirror, tmp_path):
    root, _ = mirror
    dest = tmp_path / "out" / nsd.EXPDESIGN
    size = transfer.fetch(str(root), nsd.EXPDESIGN, dest)
    assert dest.read_bytes() == (root / nsd.EXPDESIGN).read_bytes() and size == dest.stat().st_size
    assert not list(dest.parent.glob(".tmp-*"))
    with pytest.raises(BraidError, match="not found in the local NSD mirror"):
        transfer.fetch(str(root), "nsddata/nope.csv", tmp_path / "nope.csv")
    assert not (tmp_path / "nope.csv").exists()


def test_fetch_from_s3_anonymously(s3_server, mirror, tmp_path):
    import boto3

    root, _ = mirror
    admin = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-2",
                         aws_access_key_id="admin", aws_secret_access_key="admin")
    admin.create_bucket(Bucket=nsd.BUCKET, CreateBucketConfiguration={"LocationConstraint": "us-east-2"})
    key = nsd.betas_key(1, 1)
    admin.upload_file(str(root / key), nsd.BUCKET, key)
    with pytest.raises(BraidError, match="access denied"):  # private until a policy opens it
        transfer.fetch(f"s3://{nsd.BUCKET}", key, tmp_path / "private.hdf5", endpoint_url=s3_server)
    assert not (tmp_path / "private.hdf5").exists()
    admin.put_object_acl(Bucket=nsd.BUCKET, Key=key, ACL="public-read")  # NSD's objects are world-readable

    dest = tmp_path / key
    transfer.fetch(f"s3://{nsd.BUCKET}", key, dest, endpoint_url=s3_server)  # no credentials anywhere
    assert dest.read_bytes() == (root / key).read_bytes()
    missing = nsd.betas_key(1, 9)
    with pytest.raises(BraidError, match=r"betas_session09.hdf5 \(endpoint http://127.0.0.1:\d+\): no such object in bucket "
                                         r"'natural-scenes-dataset'"):
        transfer.fetch(f"s3://{nsd.BUCKET}", missing, tmp_path / "x.hdf5", endpoint_url=s3_server)
    assert not (tmp_path / "x.hdf5").exists()


def public_bucket(endpoint, root, keys):
    """The synthetic mirror's ``keys`` in a bucket named like NSD's, readable anonymously."""
    import boto3

    admin = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-2",
                         aws_access_key_id="admin", aws_secret_access_key="admin")
    admin.create_bucket(Bucket=nsd.BUCKET, CreateBucketConfiguration={"LocationConstraint": "us-east-2"})
    for key in keys:
        admin.upload_file(str(root / key), nsd.BUCKET, key, ExtraArgs={"ACL": "public-read"})
    return admin


def roi_zyx(root, subject=1):
    import nibabel as nib

    return np.asarray(nib.load(root / nsd.roi_key(subject, "nsdgeneral")).dataobj).T == 1


def test_a_truncated_hdf5_in_the_mirror_is_refused_at_fetch_naming_the_mirror_file(mirror, tmp_path):
    """The superblock records the file's length (h5py writes it): a cut-short copy is caught before
    anything is written, whether the fetch copies the whole object or reads the ROI's chunks."""
    import h5py

    root, _ = mirror
    key = nsd.betas_key(1, 1)
    cut = tmp_path / "mirror"
    (cut / key).parent.mkdir(parents=True)
    data = (root / key).read_bytes()
    (cut / key).write_bytes(data[: len(data) - 1000])
    with h5py.File(root / key, "r") as f:  # h5py's own record of the length (the superblock's end-of-file address)
        assert f.id.get_filesize() == len(data)
    message = rf"{cut / key}: truncated: its HDF5 superblock says the file is {len(data):,} bytes long, but it has " \
              rf"{len(data) - 1000:,}; the local NSD mirror's copy .* is incomplete"
    with pytest.raises(BraidError, match=message):
        transfer.fetch(str(cut), key, tmp_path / "whole.hdf5")
    with pytest.raises(BraidError, match=message):
        transfer.fetch_betas_roi(str(cut), key, tmp_path / "roi.hdf5", roi_zyx(root))
    assert not list(tmp_path.glob("*.hdf5*")) and not list(tmp_path.glob(".tmp-*"))
    transfer.fetch(str(root), key, tmp_path / "whole.hdf5")  # the whole file passes
    assert (tmp_path / "whole.hdf5").read_bytes() == data


def test_roi_only_fetch_equals_whole_file_then_mask(s3_server, mirror, tmp_path):
    import h5py

    from braid.betas import read_session

    root, _ = mirror
    key = nsd.betas_key(1, 2)
    public_bucket(s3_server, root, [key])
    mask = roi_zyx(root)
    entry = transfer.fetch_betas_roi(f"s3://{nsd.BUCKET}", key, tmp_path / "roi.hdf5", mask, endpoint_url=s3_server)
    with h5py.File(root / key, "r") as f:
        whole = f["betas"][:][:, mask]
    np.testing.assert_array_equal(read_session(tmp_path / "roi.hdf5", mask), whole.astype(np.float32) / 300)
    assert entry["mode"] == "roi" and entry["chunks"] == mask.sum()
    assert entry["bytes_ideal"] == mask.sum() * 60 * 2
    # the chunk index's leaves are read in merged requests, which bring wanted chunks with them:
    # what is fetched covers the ideal bytes, and stays well under the whole object
    fetched = entry["bytes_metadata"] + entry["bytes_data"]
    assert entry["bytes_ideal"] <= fetched < entry["bytes_object"] / 2
    # the manifest's checksum is that of the source's own chunk bytes
    import hashlib

    with h5py.File(root / key, "r") as f:
        read = f["betas"].id.read_direct_chunk
        digest = hashlib.sha256(b"".join(read((0, *c))[1] for c in np.argwhere(mask).tolist()))
    assert entry["sha256_fetched"] == digest.hexdigest()
    # without merging gaps, exactly the ideal bytes are requested
    exact = transfer.fetch_betas_roi(f"s3://{nsd.BUCKET}", key, tmp_path / "exact.hdf5", mask, gap_chunks=0, endpoint_url=s3_server)
    assert exact["bytes_data"] == exact["bytes_ideal"] and exact["requests"] >= entry["requests"]
    # the same from a local mirror
    transfer.fetch_betas_roi(str(root), key, tmp_path / "local.hdf5", mask)
    np.testing.assert_array_equal(read_session(tmp_path / "local.hdf5", mask), whole.astype(np.float32) / 300)


def test_a_multipart_object_altered_on_the_way_is_refused_by_its_etag(s3_server, fault_proxy, tmp_path, caplog):
    """A multipart upload's ETag is the MD5 of its parts' MD5s: one flipped bit (length kept) in a
    whole-object download is caught and nothing is left behind; an unaltered download verifies."""
    import boto3
    from boto3.s3.transfer import TransferConfig

    admin = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-2",
                         aws_access_key_id="admin", aws_secret_access_key="admin")
    admin.create_bucket(Bucket=nsd.BUCKET, CreateBucketConfiguration={"LocationConstraint": "us-east-2"})
    data = np.random.default_rng(3).integers(0, 256, 11 * 2**20, dtype=np.uint8).tobytes()
    (tmp_path / "obj").write_bytes(data)
    admin.upload_file(str(tmp_path / "obj"), nsd.BUCKET, nsd.STIMULI, ExtraArgs={"ACL": "public-read"},
                      Config=TransferConfig(multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20))
    parts = [data[i : i + 5 * 2**20] for i in range(0, len(data), 5 * 2**20)]
    etag = admin.head_object(Bucket=nsd.BUCKET, Key=nsd.STIMULI)["ETag"].strip('"')
    assert etag == hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + "-3"  # S3's rule

    dest = tmp_path / "stimuli.hdf5"
    fault_proxy.flips = {1: (6 * 2**20 + 5, 0x01)}  # the first GET (the whole object: one part of 16 MB)
    with pytest.raises(BraidError, match=r"do not match the object's multipart ETag \(3 parts of 5242880 bytes\)"):
        transfer.fetch(f"s3://{nsd.BUCKET}", nsd.STIMULI, dest, endpoint_url=fault_proxy.endpoint)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["obj"]  # nothing kept that a rerun would trust
    caplog.set_level(logging.INFO, logger="braid.transfer")
    transfer.fetch(f"s3://{nsd.BUCKET}", nsd.STIMULI, dest, endpoint_url=fault_proxy.endpoint)
    assert dest.read_bytes() == data
    assert "verified (multipart ETag (3 parts of 5242880 bytes)" in caplog.text


def test_s3s_stored_sha256_and_crc32_are_checked_where_the_object_has_them(s3_server, tmp_path, caplog):
    import boto3

    admin = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-2",
                         aws_access_key_id="admin", aws_secret_access_key="admin")
    admin.create_bucket(Bucket=nsd.BUCKET, CreateBucketConfiguration={"LocationConstraint": "us-east-2"})
    admin.put_object(Bucket=nsd.BUCKET, Key=nsd.EXPDESIGN, Body=b"design" * 1000, ChecksumAlgorithm="SHA256",
                     ACL="public-read")
    caplog.set_level(logging.INFO, logger="braid.transfer")
    transfer.fetch(f"s3://{nsd.BUCKET}", nsd.EXPDESIGN, tmp_path / "d.mat", endpoint_url=s3_server)
    assert re.search(r"verified \(MD5 \(ETag\), SHA-256 \(S3 checksum\)", caplog.text), caplog.text
    admin.put_object(Bucket=nsd.BUCKET, Key=nsd.STIM_INFO, Body=b"info" * 1000, ChecksumAlgorithm="CRC32",
                     ACL="public-read")
    transfer.fetch(f"s3://{nsd.BUCKET}", nsd.STIM_INFO, tmp_path / "i.csv", endpoint_url=s3_server)
    assert re.search(r"verified \(MD5 \(ETag\), CRC-32 \(S3 checksum\)", caplog.text), caplog.text


def test_a_malformed_chunk_index_is_read_again_as_a_transfer_fault(s3_server, fault_proxy, mirror, tmp_path, caplog):
    """A bit flipped on the way in the file's first bytes (the superblock's end-of-file address: the
    file then looks cut short) is read again, not blamed on the file; the ROI fetch is exact."""
    import h5py

    from braid.betas import read_session

    root, _ = mirror
    key = nsd.betas_key(1, 2)
    public_bucket(s3_server, root, [key])
    with open(root / key, "rb") as f:
        assert f.read(9) == b"\x89HDF\r\n\x1a\n\x00"  # superblock version 0: end-of-file address at byte 40
    mask = roi_zyx(root)
    fault_proxy.flips = {1: (45, 0x40)}  # the first GET reads the file's head
    caplog.set_level(logging.WARNING, logger="braid.transfer")
    transfer.fetch_betas_roi(f"s3://{nsd.BUCKET}", key, tmp_path / "roi.hdf5", mask, endpoint_url=fault_proxy.endpoint)
    assert "read as malformed" in caplog.text and "altered in transit" in caplog.text
    assert "plain HTTP" in caplog.text and caplog.text.count("is plain HTTP") == 1
    with h5py.File(root / key, "r") as f:
        whole = f["betas"][:][:, mask]
    np.testing.assert_array_equal(read_session(tmp_path / "roi.hdf5", mask), whole.astype(np.float32) / 300)


def test_an_endpoint_that_keeps_answering_503_gets_advice(s3_server, fault_proxy, mirror, tmp_path):
    root, _ = mirror
    key = nsd.betas_key(1, 2)
    public_bucket(s3_server, root, [key])
    src = transfer.RangeSource(f"s3://{nsd.BUCKET}", key, attempts=2, endpoint_url=fault_proxy.endpoint,
                               request_attempts=1)
    fault_proxy.status = 503
    with pytest.raises(BraidError, match=r"failed 2 times .*503 \(SlowDown / Service Unavailable\).*"
                                         r"Wait a few minutes.*BRAID_RANGE_PARALLEL"):
        src.read(0, 100)


def test_roi_only_falls_back_to_whole_object_for_other_layouts(s3_server, mirror, tmp_path, caplog):
    import h5py

    root, _ = mirror
    key = nsd.betas_key(1, 1)
    odd = tmp_path / "mirror"
    (odd / key).parent.mkdir(parents=True)
    with h5py.File(root / key, "r") as f, h5py.File(odd / key, "w") as g:
        g.create_dataset("betas", data=f["betas"][:], chunks=(60, 2, 2, 2), compression="gzip")
    public_bucket(s3_server, odd, [key])
    with caplog.at_level("WARNING", logger="braid.transfer"):
        entry = transfer.fetch_betas_roi(f"s3://{nsd.BUCKET}", key, tmp_path / "out.hdf5", roi_zyx(root), endpoint_url=s3_server)
    assert entry["mode"] == "whole" and "downloading the whole object" in caplog.text
    assert (tmp_path / "out.hdf5").read_bytes() == (odd / key).read_bytes()


def test_stimuli_rows_only(s3_server, mirror, tmp_path):
    import h5py

    root, _ = mirror
    public_bucket(s3_server, root, [nsd.STIMULI])
    entry = transfer.fetch_stimuli_rows(f"s3://{nsd.BUCKET}", nsd.STIMULI, tmp_path / "s.hdf5", np.array([7, 3, 7]),
                                   endpoint_url=s3_server)
    with h5py.File(root / nsd.STIMULI, "r") as f, h5py.File(tmp_path / "s.hdf5", "r") as g:
        assert g["imgBrick"].shape == f["imgBrick"].shape
        np.testing.assert_array_equal(g["imgBrick"][[3, 7]], f["imgBrick"][[3, 7]])
        assert not g["imgBrick"][4].any()  # not fetched
    assert entry["chunks"] == 2 and entry["bytes_data"] == 2 * 425 * 425 * 3


def test_a_partial_download_resumes_only_into_the_same_pieces(tmp_path):
    """Pieces of the same count and total but other lengths (a ROI fetch resumed without its index
    cache plans other runs) start again: a kept piece is never read back as another."""
    identity = {"key": "k", "size": 10}
    first = transfer.PartialDownload(tmp_path / "out", identity, [4, 6])
    first.write(0, b"abcd")
    first.close()
    same = transfer.PartialDownload(tmp_path / "out", identity, [4, 6])
    assert same.todo() == [1] and same.read(0) == b"abcd"
    same.close()
    other = transfer.PartialDownload(tmp_path / "out", identity, [6, 4])
    assert other.todo() == [0, 1] and other.read(0) == bytes(6)
    other.close()


def test_whole_object_resumes_after_a_kill(s3_server, fault_proxy, mirror, tmp_path):
    root, _ = mirror
    key = nsd.betas_key(1, 1)
    public_bucket(s3_server, root, [key])
    dest = tmp_path / "betas.hdf5"
    size = (root / key).stat().st_size
    part = 64 * 1024
    n_parts = -(-size // part)

    fault_proxy.fail_after = n_parts // 3  # the network dies a third of the way: the fetch fails, keeping its parts
    with pytest.raises(BraidError, match="failed 5 times"):
        transfer.fetch(f"s3://{nsd.BUCKET}", key, dest, endpoint_url=fault_proxy.endpoint, part_size=part)
    assert not dest.exists()
    assert (tmp_path / "betas.hdf5.part").exists() and (tmp_path / "betas.hdf5.part.json").exists()
    fault_proxy.down, fault_proxy.fail_after = False, None
    gets_before = fault_proxy.gets
    transfer.fetch(f"s3://{nsd.BUCKET}", key, dest, endpoint_url=fault_proxy.endpoint, part_size=part)
    assert dest.read_bytes() == (root / key).read_bytes()
    assert fault_proxy.gets - gets_before < n_parts  # only the missing parts were fetched again
    assert not (tmp_path / "betas.hdf5.part").exists() and not (tmp_path / "betas.hdf5.part.json").exists()


def test_injected_faults_end_with_correct_files(s3_server, fault_proxy, mirror, tmp_path):
    import h5py

    from braid.betas import read_session

    root, _ = mirror
    keys = [nsd.betas_key(1, 1), nsd.STIMULI]
    public_bucket(s3_server, root, keys)
    fault_proxy.rate = 0.3  # 500s, connection resets and truncated bodies, 10 % each
    source = f"s3://{nsd.BUCKET}"
    transfer.fetch(source, keys[0], tmp_path / "whole.hdf5", endpoint_url=fault_proxy.endpoint, part_size=32 * 1024)
    assert (tmp_path / "whole.hdf5").read_bytes() == (root / keys[0]).read_bytes()
    mask = roi_zyx(root)
    transfer.fetch_betas_roi(source, keys[0], tmp_path / "roi.hdf5", mask, endpoint_url=fault_proxy.endpoint)
    with h5py.File(root / keys[0], "r") as f:
        np.testing.assert_array_equal(read_session(tmp_path / "roi.hdf5", mask), f["betas"][:][:, mask] / np.float32(300))
    transfer.fetch_stimuli_rows(source, keys[1], tmp_path / "s.hdf5", np.arange(0, 40, 3), endpoint_url=fault_proxy.endpoint)
    with h5py.File(root / keys[1], "r") as f, h5py.File(tmp_path / "s.hdf5", "r") as g:
        np.testing.assert_array_equal(g["imgBrick"][0:40:3], f["imgBrick"][0:40:3])
    assert fault_proxy.faults > 5  # the faults really happened


def test_whole_object_resumes_after_sigkill(s3_server, fault_proxy, mirror, tmp_path):
    """A fetch process killed mid-transfer leaves a record that the next fetch continues from."""
    import signal
    import subprocess
    import sys
    import time

    root, _ = mirror
    key = nsd.betas_key(1, 2)
    public_bucket(s3_server, root, [key])
    dest, part = tmp_path / "betas.hdf5", 8 * 1024
    n_parts = -(-(root / key).stat().st_size // part)
    fault_proxy.delay = 0.2
    code = (f"from braid import nsd, transfer; transfer.fetch('s3://{nsd.BUCKET}', {key!r}, {str(dest)!r}, "
            f"endpoint_url={fault_proxy.endpoint!r}, part_size={part})")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=open(tmp_path / "child.log", "w"))
    record = tmp_path / "betas.hdf5.part.json"
    deadline = time.time() + 30
    while time.time() < deadline and not (record.exists() and len(json.loads(record.read_text())["done"]) >= 10):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(json.loads(record.read_text())["done"])
    assert 10 <= done < n_parts and not dest.exists()
    fault_proxy.delay = 0.0
    gets_before = fault_proxy.gets
    transfer.fetch(f"s3://{nsd.BUCKET}", key, dest, endpoint_url=fault_proxy.endpoint, part_size=part)
    assert dest.read_bytes() == (root / key).read_bytes()
    assert fault_proxy.gets - gets_before <= n_parts - done + 8  # in-flight parts at the kill are fetched again


def test_wrong_bucket_and_unreachable_endpoint_name_what_to_fix(s3_server, tmp_path):
    key = nsd.EXPDESIGN
    with pytest.raises(BraidError, match=r"the bucket 'no-such-bucket' does not exist at this endpoint.*nsd.source"):
        transfer.fetch("s3://no-such-bucket", key, tmp_path / "x.mat", endpoint_url=s3_server)
    from conftest import free_port

    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(BraidError, match=rf"cannot reach the S3 endpoint {closed}.*local rules"):
        transfer.fetch(f"s3://{nsd.BUCKET}", key, tmp_path / "x.mat", endpoint_url=closed)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_roi_only_fetch_resumes_without_reading_metadata_again(s3_server, fault_proxy, mirror, tmp_path):
    import h5py

    from braid.betas import read_session

    root, _ = mirror
    key = nsd.betas_key(1, 1)
    public_bucket(s3_server, root, [key])
    mask = roi_zyx(root)
    dest = tmp_path / "roi.hdf5"
    source = f"s3://{nsd.BUCKET}"
    full = transfer.fetch_betas_roi(source, key, tmp_path / "full.hdf5", mask, gap_chunks=0, endpoint_url=s3_server)
    fault_proxy.fail_after = fault_proxy.gets + full["requests"] // 2  # the network dies half way through
    with pytest.raises(BraidError, match="failed 5 times"):
        transfer.fetch_betas_roi(source, key, dest, mask, gap_chunks=0, endpoint_url=fault_proxy.endpoint)
    assert not dest.exists() and (tmp_path / "roi.hdf5.part.plan.npz").exists()
    fault_proxy.down, fault_proxy.fail_after = False, None
    gets = fault_proxy.gets
    again = transfer.fetch_betas_roi(source, key, dest, mask, gap_chunks=0, endpoint_url=fault_proxy.endpoint)
    assert again["bytes_metadata"] == 0 and again["resumed_runs"] > 0  # the plan and the runs were kept
    assert fault_proxy.gets - gets < full["requests"]
    assert again["sha256_fetched"] == full["sha256_fetched"]
    with h5py.File(root / key, "r") as f:
        np.testing.assert_array_equal(read_session(dest, mask), f["betas"][:][:, mask] / np.float32(300))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full.hdf5", "roi.hdf5"]  # no .part* left
    # another ROI is another request: its plan is made afresh, not the old one reused
    other = transfer.fetch_betas_roi(source, key, tmp_path / "other.hdf5", mask & (np.cumsum(mask) % 2 == 0).reshape(mask.shape),
                                endpoint_url=s3_server)
    assert other["chunks"] < full["chunks"]


def test_a_second_fetch_of_the_same_file_is_refused_while_the_first_runs(s3_server, fault_proxy, mirror, tmp_path):
    """An orphaned fetch and a rerun must not write one .part: the second is refused until the first dies."""
    import signal
    import subprocess
    import sys
    import time

    root, _ = mirror
    key = nsd.betas_key(1, 2)
    public_bucket(s3_server, root, [key])
    dest = tmp_path / "betas.hdf5"
    fault_proxy.delay = 0.2
    code = (f"from braid import nsd, transfer; transfer.fetch('s3://{nsd.BUCKET}', {key!r}, {str(dest)!r}, "
            f"endpoint_url={fault_proxy.endpoint!r}, part_size=8192)")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=open(tmp_path / "child.log", "w"))
    deadline = time.time() + 30
    while time.time() < deadline and not (tmp_path / "betas.hdf5.part.json").exists():
        time.sleep(0.05)
    with pytest.raises(BraidError, match=r"another process is fetching it now \(lock .*betas.hdf5.part.lock is held\)"):
        transfer.fetch(f"s3://{nsd.BUCKET}", key, dest, endpoint_url=s3_server, part_size=8192)
    assert (tmp_path / "betas.hdf5.part.lock").exists()  # the refused process leaves the holder's lock alone
    proc.send_signal(signal.SIGKILL)  # the lock dies with its holder
    proc.wait()
    fault_proxy.delay = 0.0
    transfer.fetch(f"s3://{nsd.BUCKET}", key, dest, endpoint_url=s3_server, part_size=8192)
    assert dest.read_bytes() == (root / key).read_bytes()
    assert not (tmp_path / "betas.hdf5.part.lock").exists()  # removed by the fetch that held it


def test_fetch_rule_fails_once_on_a_missing_key_and_keeps_each_runs_log(s3_server, tmp_path):
    """A 404 is deterministic: Snakemake must not retry it. Snakemake deletes a job's log before each
    attempt; the history log beside it keeps every attempt."""
    import subprocess
    import sys

    import boto3
    import yaml

    admin = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-2",
                         aws_access_key_id="admin", aws_secret_access_key="admin")
    admin.create_bucket(Bucket=nsd.BUCKET, CreateBucketConfiguration={"LocationConstraint": "us-east-2"})
    config = tmp_path / "s3.yaml"
    config.write_text(yaml.safe_dump({"nsd": {"source": f"s3://{nsd.BUCKET}", "endpoint_url": s3_server},
                                      "semantic_encoders": {}}))  # no captions in this bucket
    repo = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "snakemake", f"resources/nsd/{nsd.EXPDESIGN}", "-s", str(repo / "Snakefile"),
           "-d", str(tmp_path / "w"), "--cores", "1", "--configfile", str(config)]
    for _ in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        assert proc.returncode != 0
        assert "Trying to restart" not in proc.stdout + proc.stderr
    logs = tmp_path / "w" / "logs" / "nsd" / "fetch" / "nsddata" / "experiments" / "nsd"
    message = f"nsd_expdesign.mat (endpoint {s3_server}): no such object in bucket 'natural-scenes-dataset'"
    for name, runs in (("nsd_expdesign.mat.log", 1), ("nsd_expdesign.mat.history.log", 2)):
        text = (logs / name).read_text()
        assert text.count("==== rule nsd_fetch, attempt 1") == runs and text.count(message) == runs, name
    assert not (tmp_path / "w" / "resources" / "nsd" / nsd.EXPDESIGN).exists()


def test_range_cache_merges_close_ranges_and_serves_what_it_kept():
    from braid.hdf5_ranges import RangeCache

    blob = bytes(range(256)) * 8
    calls = []

    def reader(offset, size):
        calls.append((offset, size))
        return blob[offset : offset + size]

    cache = RangeCache(reader, parallel=4)
    got = cache.read_many([(0, 10), (20, 10), (100, 10)], max_gap=15)
    assert got == [blob[0:10], blob[20:30], blob[100:110]]
    assert sorted(calls) == [(0, 30), (100, 10)]  # 10 bytes apart: one request; 70 apart: another
    assert cache.read(5, 20) == blob[5:25] and len(calls) == 2  # inside a kept block: no request
    assert cache.read(25, 10) == blob[25:35] and len(calls) == 3  # past its end: a request
    cache.read_many([(500, 5)])
    cache.read_many([(490, 40)])  # a block around the small one replaces it
    assert cache.read(515, 10) == blob[515:525] and len(calls) == 5


@pytest.mark.parametrize("seed", range(20))
def test_range_cache_holds_the_union_of_what_it_fetched(seed):
    """Blocks that overlap, touch or contain each other, fetched in any order: every byte any of them
    brought is served from the cache, unchanged, and nothing else is."""
    from braid.hdf5_ranges import RangeCache

    rng = np.random.default_rng(seed)
    blob = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    calls = []

    def reader(offset, size):
        calls.append((offset, size))
        return blob[offset : offset + size]

    cache = RangeCache(reader, parallel=2)
    fetched = np.zeros(len(blob), bool)
    for _ in range(12):
        ranges = [(int(o), int(n)) for o, n in zip(rng.integers(0, 3900, 3), rng.integers(1, 190, 3))]
        cache.read_many(ranges, max_gap=int(rng.integers(0, 60)))
        for o, n in calls:
            fetched[o : o + n] = True
        before = len(calls)
        for o, n in ranges:
            assert cache.cached(o, n) == blob[o : o + n]
        assert len(calls) == before
    for o in range(0, len(blob), 7):
        for n in (1, 9, 40):
            hit = cache.cached(o, n)
            inside = o + n <= len(blob) and fetched[o : o + n].all()
            assert (hit is not None) == inside, (o, n)
            assert hit is None or hit == blob[o : o + n]


def test_merge_gap_is_the_largest_within_the_budget():
    from braid.hdf5_ranges import merge_gap

    offsets, gaps = [0, 100, 1000], (0, 50, 500, 5000)
    # gap 0 and 50: 3 x 10 bytes; 500: [0, 110) + 10 = 120 bytes; 5000: [0, 1010) = 1010 bytes
    assert merge_gap(offsets, 10, 29, gaps) == 0
    assert merge_gap(offsets, 10, 119, gaps) == 50
    assert merge_gap(offsets, 10, 120, gaps) == 500
    assert merge_gap(offsets, 10, 1010, gaps) == 5000


def test_a_roi_fetch_reads_the_chunk_index_in_few_requests(tmp_path):
    """A file with NSD's layout and a deep chunk index (38,400 one-voxel chunks of 750 trials), an ROI
    of 2.5 % of them like nsdgeneral's 2.2 %: the merged index reads cut the requests at least
    fivefold against one per B-tree node and run, with the same values."""
    import h5py

    from braid.betas import read_session

    rng = np.random.default_rng(0)
    key = nsd.betas_key(1, 1)
    (tmp_path / key).parent.mkdir(parents=True)
    values = rng.integers(-3000, 3000, size=(750, 16, 40, 60), dtype=np.int16)  # 1,500-byte chunks, as NSD
    with h5py.File(tmp_path / key, "w") as f:
        f.create_dataset("betas", data=values, chunks=(750, 1, 1, 1))
    mask = np.zeros(values.shape[1:], bool)
    mask[4:12, 3:9, 5:25] = True  # 960 voxels, rows of 20 adjacent chunks
    merged = transfer.fetch_betas_roi(str(tmp_path), key, tmp_path / "merged.hdf5", mask)
    exact = transfer.fetch_betas_roi(str(tmp_path), key, tmp_path / "exact.hdf5", mask, gap_chunks=0)
    expected = values[:, mask].astype(np.float32) / 300
    np.testing.assert_array_equal(read_session(tmp_path / "merged.hdf5", mask), expected)
    np.testing.assert_array_equal(read_session(tmp_path / "exact.hdf5", mask), expected)
    assert exact["requests"] >= 3 * merged["requests"], (exact["requests"], merged["requests"])  # 129 vs 23 here
    assert merged["bytes_metadata"] + merged["bytes_data"] <= merged["bytes_object"] / 4
