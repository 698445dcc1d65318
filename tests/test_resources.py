"""Job sizes (braid.resources) against independent counts: torch's own parameter counts, numpy
voxel counts of NIfTI files written here, h5py shapes, file sizes on disk, and the arrays that
the masking stage really allocates (tracemalloc)."""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc

import h5py
import nibabel as nib
import numpy as np
import pytest
import torch.nn as nn

from braid import resources


def torch_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_seed_mlp_has_its_published_parameter_count():
    # the design card's seed MLP, 4,657 -> 2,048 -> 4,096 -> 16,384: 85,069,824 parameters
    assert resources.mlp_parameters(4657, 16384, [2048, 4096]) == 85_069_824


@pytest.mark.parametrize("hidden", [[], [7], [5, 11, 3]])
def test_mlp_parameters_match_torch(hidden):
    layers, width = [], 13
    for h in hidden:
        layers += [nn.Linear(width, h), nn.LayerNorm(h), nn.ReLU(), nn.Dropout(0.5)]
        width = h
    layers.append(nn.Linear(width, 17))
    assert resources.encoder_parameters({"type": "mlp", "hidden": hidden}, 13, 17) == torch_count(nn.Sequential(*layers))


def test_lowrank_parameters_match_torch():
    model = nn.Sequential(nn.Linear(40, 6, bias=False), nn.Linear(6, 9))
    assert resources.encoder_parameters({"type": "lowrank", "rank": 6}, 40, 9) == torch_count(model)


def test_roi_voxels_count_the_union_of_the_named_labels(tmp_path):
    a = np.zeros((4, 5, 6), np.int16)
    b = np.zeros_like(a)
    a[0, :, 0] = 1  # 5 voxels, label 1
    a[1, :2, 1] = 2  # 2 voxels, label 2 (not asked for)
    a[2, 0, :] = 3  # 6 voxels, label 3
    b[0, :, 0] = 1  # the same 5 as a's label 1: counted once
    b[3, 3, :3] = 1  # 3 new voxels
    files = {}
    for name, data in (("lh.roi", a), ("rh.roi", b)):
        files[name] = str(tmp_path / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(data, np.eye(4)), files[name])
    expected = int((np.isin(a, [1, 3]) | (b == 1)).sum())
    assert expected == 5 + 6 + 3
    assert resources.roi_voxels(files, {"lh.roi": [1, 3], "rh.roi": [1]}) == expected
    assert resources.roi_voxels({**files, "x": str(tmp_path / "missing.nii.gz")}, {}) is None


def test_roi_voxels_reads_each_volume_once_until_it_changes(tmp_path, monkeypatch):
    """Snakemake asks at every scheduling pass; a rewritten ROI file is read again."""
    import os

    data = np.zeros((4, 5, 6), np.int16)
    data[1, :, 2] = 1
    path = tmp_path / "roi.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    loads = []
    real_load = nib.load
    monkeypatch.setattr(nib, "load", lambda f: loads.append(f) or real_load(f))
    files = {"roi": str(path)}
    assert [resources.roi_voxels(files, {"roi": [1]}) for _ in range(5)] == [5] * 5
    assert len(loads) == 1
    assert resources.roi_voxels(files, {"roi": [1, 2]}) == 5 and len(loads) == 2  # other labels: read again
    data[3, 3, :] = 1
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))  # a later mtime, as a rewrite has
    assert resources.roi_voxels(files, {"roi": [1]}) == 5 + 6 and len(loads) == 3


def test_session_trials_reads_the_betas_shape(tmp_path):
    path = tmp_path / "betas_session01.hdf5"
    with h5py.File(path, "w") as f:
        f.create_dataset("betas", shape=(37, 3, 4, 5), dtype="i2")
    assert resources.session_trials(path) == 37
    assert resources.session_trials(tmp_path / "absent.hdf5") is None


def test_weights_bytes_counts_only_the_variant_a_load_reads(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "vae").mkdir()
    for name, size in (("unet/diffusion_pytorch_model.safetensors", 4000),
                       ("unet/diffusion_pytorch_model.fp16.safetensors", 2000),
                       ("vae/diffusion_pytorch_model.fp16.safetensors", 300),
                       ("vae/config.json", 50)):
        (tmp_path / name).write_bytes(b"\0" * size)
    assert resources.weights_bytes(tmp_path, "fp16") == 2300
    assert resources.weights_bytes(tmp_path) == 6300
    assert resources.weights_bytes(tmp_path / "vae", None) == 300
    assert resources.weights_bytes(tmp_path / "nothing") is None


def test_zarr_shape_reads_the_array_metadata(tmp_path):
    import zarr

    zarr.open_group(tmp_path / "g.zarr", mode="w").create_array("betas", shape=(12, 34), dtype="f4")
    assert resources.zarr_shape(tmp_path / "g.zarr" / "betas") == (12, 34)
    assert resources.zarr_shape(tmp_path / "g.zarr" / "absent") is None


@pytest.fixture(scope="module")
def large_roi_mirror(tmp_path_factory, tiny_model, synthetic_cfg):
    """A synthetic subject whose ROI is large enough (10,800 voxels, 120-trial sessions) that the
    masked data, not the fixed costs (design tables), dominate what masking allocates."""
    from braid.synthetic import generate

    cfg = {**synthetic_cfg, "subjects": [1], "volume": [30, 30, 30], "roi_fraction": 0.4, "trials_per_session": 120,
           "images_per_subject": 90}
    root = tmp_path_factory.mktemp("nsd_large_roi")
    generate(cfg, tiny_model, root, image_size=64)
    return root, cfg


@pytest.mark.parametrize("trials", ["single", "average"])
def test_masking_estimate_covers_what_masking_allocates(large_roi_mirror, tmp_path, trials):
    """The masking stage's numpy arrays at their peak (tracemalloc): within the estimate, and not
    far below it (the estimate is a bound, not a blanket)."""
    from braid import betas, nsd

    root, cfg = large_roi_mirror
    sessions = list(range(1, cfg["sessions"] + 1))
    rois = {"nsdgeneral": str(root / nsd.roi_key(1, "nsdgeneral"))}
    voxels = resources.roi_voxels(rois, {"nsdgeneral": [1]})
    tracemalloc.start()
    betas.build(subject=1, session_files={s: root / nsd.betas_key(1, s) for s in sessions}, roi_files=rois,
                roi_labels={"nsdgeneral": [1]}, expdesign_path=root / nsd.EXPDESIGN, out_zarr=tmp_path / "b.zarr",
                out_trials=tmp_path / "t.parquet",
                split={"rule": "seed", "train": 0.7, "val": 0.15, "test": 0.15, "seed": 0}, trials=trials)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    estimate = resources.betas_mask_bytes(len(sessions), cfg["trials_per_session"], voxels, average=trials != "single")
    print(trials, voxels, peak, estimate)
    assert peak <= estimate <= 3 * peak


@pytest.mark.parametrize("cpus", [None, 1])
def test_use_threads_sets_torchs_thread_count_within_the_cpus_it_may_use(cpus):
    """The job's threads, but never more than the CPUs of its affinity (SLURM's allocation, a taskset)."""
    pin = f"os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:{cpus}]); " if cpus else ""
    code = (f"import os; {pin}import torch; from braid.common import use_threads; use_threads(3); "
            "print(torch.get_num_threads(), os.environ['OMP_NUM_THREADS'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=os.environ | {"OMP_NUM_THREADS": "1"}).stdout.split()
    expected = str(min(3, cpus or len(os.sched_getaffinity(0))))
    assert out == [expected, expected]
