"""Checksummed Zarr stores, folder manifests, the run check (braid.verify) and the output lock.

Damage is made with plain file operations (truncate, flip a byte, delete, replace) and the
expectations are computed independently: chunk files are counted from zarr's own chunk grid,
hashes with hashlib.
"""

import hashlib
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import zarr

from braid.common import BraidError, output_lock
from braid.integrity import (MANIFEST, check_folder, folder_damage, new_array, new_group, open_store,
                             store_damage, write_folder_manifest)
from braid import verify


def make_store(path, rule="betas_mask"):
    root = new_group(path, rule=rule)
    new_array(root, "betas", data=np.arange(600, dtype=np.float32).reshape(60, 10), chunks=(16, 10))
    new_array(root, "zeros", data=np.zeros((40,), np.float32), chunks=(10,))  # all fill value
    val = root.create_group("val")
    new_array(val, "pred", data=np.ones((5, 2, 2), np.float32), chunks=(2, 2, 2))
    return Path(path)


def chunk_files(store):
    return sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file() and p.name != "zarr.json")


def test_every_chunk_is_written_with_a_checksum_even_fill_value_chunks(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    # ceil(60/16)=4 + ceil(40/10)=4 + ceil(5/2)=3 chunks, every one on disk
    assert len(chunk_files(store)) == 4 + 4 + 3
    meta = json.loads((store / "betas" / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"]] == ["bytes", "zstd", "crc32c"]
    assert json.loads((store / "zarr.json").read_text())["attributes"]["braid_rule"] == "betas_mask"
    np.testing.assert_array_equal(np.asarray(open_store(store)["betas"][:]), np.arange(600).reshape(60, 10))
    assert store_damage(store) == []


def test_a_truncated_chunk_is_named_with_its_store_rule_and_repair_on_read(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    chunk = store / "betas" / "c" / "2" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-7])
    root = open_store(store / "zarr.json")
    np.asarray(root["betas"][:16])  # an intact chunk still reads
    with pytest.raises(BraidError) as err:
        np.asarray(root["betas"][:])
    msg = str(err.value)
    assert str(store) in msg and "chunk betas/c/2/0 is damaged" in msg
    assert "rule betas_mask" in msg and f"snakemake --forcerun {store / 'zarr.json'}" in msg
    assert "\n" not in msg


def test_a_flipped_byte_of_the_same_length_fails_its_checksum(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    chunk = store / "val" / "pred" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10
    chunk.write_bytes(bytes(data))
    problems = store_damage(store)
    assert len(problems) == 1 and problems[0].startswith("chunk val/pred/c/1/0/0 is damaged")
    with pytest.raises(BraidError, match="val/pred/c/1/0/0"):
        open_store(store)["val"]["pred"].get_orthogonal_selection(([2, 3],))


def test_a_deleted_chunk_is_refused_at_open_not_read_as_zeros(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    (store / "zeros" / "c" / "3").unlink()
    assert store_damage(store) == ["chunk zeros/c/3 is missing"]
    with pytest.raises(BraidError, match="chunk zeros/c/3 is missing"):
        open_store(store)


def test_unreadable_metadata_and_a_missing_store_are_named(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    (store / "betas" / "zarr.json").write_text("{not json")
    assert store_damage(store)[0].startswith("its metadata cannot be read")
    with pytest.raises(BraidError, match=r"s\.zarr is damaged"):
        np.asarray(open_store(store)["betas"][:])
    with pytest.raises(BraidError, match=r"no Zarr store here .*rule encoder_train"):
        open_store(tmp_path / "none.zarr", rule="encoder_train")


def test_a_shared_cache_ignores_uncommitted_rows_and_is_rebuilt_whole(tmp_path):
    store = tmp_path / "cache.zarr"
    root = new_group(store, rule="latents_encode")
    new_array(root, "latents", data=np.ones((30, 4), np.float32), chunks=(10, 4))
    root.attrs["n_committed"] = 12  # rows 12.. are an interrupted append
    (store / "latents" / "c" / "2" / "0").unlink()  # rows 20-29: never committed
    assert store_damage(store) == []
    (store / "latents" / "c" / "1" / "0").unlink()  # rows 10-19 hold committed rows 10, 11
    assert store_damage(store) == ["chunk latents/c/1/0 is missing"]
    damaged = [verify.Damaged(Path("cache.zarr"), ["x"], "latents_encode", "cache.zarr/zarr.json"),
               verify.Damaged(Path("b.zarr"), ["y"], "betas_mask", "b.zarr/zarr.json")]
    assert verify.repair_commands(damaged) == [
        "rm -r cache.zarr", "snakemake --forcerun b.zarr/zarr.json latents_encode"]


def test_a_folder_manifest_names_missing_added_resized_and_replaced_files(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, content in enumerate([b"a" * 10, b"b" * 20, b"c" * 30]):
        (folder / f"{i}.png").write_bytes(content)
    manifest = write_folder_manifest(folder, rule="reconstruct_decode")
    assert manifest["files"]["1.png"] == {"bytes": 20, "sha256": hashlib.sha256(b"b" * 20).hexdigest()}
    (folder / ".snakemake_timestamp").touch()  # Snakemake's own file in directory() outputs
    assert folder_damage(folder) == []
    check_folder(folder)

    (folder / "0.png").unlink()
    (folder / "1.png").write_bytes(b"B" * 20)  # same size, other bytes
    (folder / "2.png").write_bytes(b"c" * 31)
    (folder / "extra.png").write_bytes(b"x")
    assert sorted(folder_damage(folder)) == sorted([
        "0.png is missing", "1.png was changed (its SHA-256 differs)", "2.png has 31 bytes, not 30",
        "extra.png is not in the manifest"])
    with pytest.raises(BraidError, match=rf"rule reconstruct_decode; rebuild it with `snakemake --forcerun {folder}`"):
        check_folder(folder)
    (folder / MANIFEST).unlink()
    with pytest.raises(BraidError, match=f"its {MANIFEST} is missing"):
        check_folder(folder, rule="reconstruct_img2img")


def run_tree(tmp_path):
    """A small results tree: a store, a folder with a manifest, a folder without one."""
    make_store(tmp_path / "results" / "subj01" / "betas.zarr")
    ok = tmp_path / "results" / "subj01" / "ridge" / "decode" / "images"
    ok.mkdir(parents=True)
    (ok / "3.png").write_bytes(b"png")
    write_folder_manifest(ok, rule="reconstruct_decode")
    return ok


def test_verify_passes_an_intact_run_and_lists_the_repair_of_a_damaged_one(tmp_path, capsys):
    images = run_tree(tmp_path)
    assert verify.main([str(tmp_path)]) == 0
    assert "all outputs verified: 1 Zarr stores" in capsys.readouterr().out

    chunk = tmp_path / "results" / "subj01" / "betas.zarr" / "betas" / "c" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:5])
    (images / "3.png").unlink()
    unfinished = tmp_path / "results" / "subj01" / "ridge" / "none" / "guidance-1" / "strength-0.5" / "seed-0" / "images"
    unfinished.mkdir(parents=True)
    assert verify.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "results/subj01/betas.zarr: chunk betas/c/0/0 is damaged" in out and "rule betas_mask" in out
    assert f"{MANIFEST} is missing" in out
    assert out.strip().splitlines()[-1].split() == [
        "snakemake", "--forcerun", "results/subj01/betas.zarr/zarr.json", "results/subj01/ridge/decode/images",
        "results/subj01/ridge/none/guidance-1/strength-0.5/seed-0/images"]
    assert verify.main([str(tmp_path / "nowhere")]) == 2


# --- the output lock --------------------------------------------------------------------------


HOLDER = textwrap.dedent("""
    import sys, time
    from braid.common import output_lock
    with output_lock(["results/a.txt", "results/b.txt"], "model_train", folder=sys.argv[1]):
        print("held", flush=True)
        time.sleep(60)
""")


def test_a_second_writer_of_the_same_outputs_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(BraidError) as err:
            with output_lock(["results/b.txt", "results/a.txt"], "model_train", folder=tmp_path):
                pass
        msg = str(err.value)
        assert f"PID {holder.pid} on host {socket.gethostname()}" in msg
        assert "results/a.txt (and 1 more outputs)" in msg and "--unlock" in msg and f"kill {holder.pid}" in msg
        with output_lock(["results/c.txt"], "model_train", folder=tmp_path):  # other outputs: free
            pass
    finally:
        holder.kill()
        holder.wait()
    # the OS released the killed holder's lock
    with output_lock(["results/a.txt", "results/b.txt"], "model_train", folder=tmp_path):
        holder_file = json.loads(next(Path(tmp_path).glob("model_train-*.lock")).read_text())
        assert holder_file["pid"] == os.getpid()


def test_verify_checks_model_folders_and_notes_stores_without_checksums(tmp_path, capsys):
    from braid.models import write_model_manifest

    run_tree(tmp_path)
    model = tmp_path / "resources" / "models" / "tiny-trained-ssd1b-seed0"
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"w" * 100)
    write_model_manifest(model)
    old = zarr.open_group(tmp_path / "results" / "subj01" / "old.zarr", mode="w")  # as an older BRAID wrote it
    old.create_array("x", data=np.zeros(10, np.float32), chunks=(5,))
    assert verify.main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "note: results/subj01/old.zarr has no chunk checksums" in out and "all outputs verified: 2 Zarr stores" in out

    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"w" * 60)  # cut short
    assert verify.main([str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "resources/models/tiny-trained-ssd1b-seed0: the model is incomplete: " \
           "unet/diffusion_pytorch_model.safetensors (60 of 100 bytes)" in out
    assert out.strip().splitlines()[-1] == "  snakemake --forcerun resources/models/tiny-trained-ssd1b-seed0"


def test_a_file_system_without_flock_runs_the_job_unguarded_with_a_warning(tmp_path, monkeypatch, caplog):
    """Lustre mounted without -o flock answers flock with ENOSYS: the guard is skipped, not the job.
    (No such file system here: flock is made to fail as it does there.)"""
    import errno
    import fcntl
    import logging

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    caplog.set_level(logging.WARNING, logger="braid")
    ran = False
    with output_lock(["results/a.txt"], "model_train", folder=tmp_path):
        ran = True
    assert ran and "cannot lock (Function not implemented)" in caplog.text and "-o flock" in caplog.text
    # a lock that guards shared data (the latent cache's appends, a fetch's .part files) is not skipped
    from braid.common import file_lock

    with pytest.raises(BraidError, match=r"cache.lock: cannot lock \(Function not implemented\).*-o flock"):
        with file_lock(tmp_path / "cache.lock", wait=True):
            pass
