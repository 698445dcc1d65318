"""The full-scale rehearsal's pieces: the real-scale synthetic subject and the resource table.

``make rehearsal`` itself (about 45 minutes) is not part of the suite; these check what it is
built from, on a smaller volume with NSD's real design.
"""

from __future__ import annotations

import h5py
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy.io import loadmat

from braid import nsd, rehearsal


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    root = tmp_path_factory.mktemp("rehearsal_bucket")
    meta = rehearsal.write_bucket(root, sessions=1, volume=(20, 24, 18), roi_voxels=300, progress=False)
    return root, meta


def test_the_bucket_has_nsds_real_design_and_key_names(bucket):
    root, meta = bucket
    design = loadmat(root / nsd.EXPDESIGN)
    order, subjectim = design["masterordering"].ravel(), design["subjectim"]
    assert order.size == 30_000 and order.min() == 1 and order.max() == 10_000
    assert np.bincount(order)[1:].tolist() == [3] * 10_000  # every image three times, as in NSD
    assert (subjectim[0] > 0).sum() == 10_000 and (subjectim[1:] == 0).all()
    assert design["sharedix"].size == 1_000 and np.isin(design["sharedix"], subjectim[0]).all()
    info = pd.read_csv(root / nsd.STIM_INFO, index_col=0)
    assert len(info) == 73_000 and info["shared1000"].sum() == 1_000
    for key in (nsd.betas_key(1, 1), nsd.roi_key(1, "nsdgeneral"), nsd.roi_key(1, "lh.nsdgeneral"),
                nsd.brainmask_key(1), nsd.ncsnr_key(1), nsd.STIM_INFO_PKL):
        assert (root / key).is_file(), key


def test_imgbrick_holds_only_the_images_the_sessions_show(bucket):
    root, meta = bucket
    design = loadmat(root / nsd.EXPDESIGN)
    shown = np.unique(design["subjectim"][0, design["masterordering"].ravel()[:750] - 1] - 1)
    assert meta["images_stored"] == shown.size
    with h5py.File(root / nsd.STIMULI, "r") as f:
        brick = f["imgBrick"]
        assert brick.shape == (73_000, 425, 425, 3) and brick.dtype == np.uint8
        assert brick[int(shown[0])].std() > 0 and brick[int(shown[-1])].std() > 0
        unseen = int(np.setdiff1d(np.arange(73_000), shown)[0])
        assert brick[unseen].max() == 0  # never written: a fill value, no bytes on disk
    assert (root / nsd.STIMULI).stat().st_size < 1.1 * shown.size * 425 * 425 * 3


def test_betas_have_nsds_layout_and_the_signal_only_in_the_roi(bucket):
    root, meta = bucket
    roi = np.asarray(nib.load(root / nsd.roi_key(1, "nsdgeneral")).dataobj)
    brain = np.asarray(nib.load(root / nsd.brainmask_key(1)).dataobj) > 0
    assert roi.shape == (20, 24, 18) and (roi == 1).sum() == meta["roi_voxels"]
    assert meta["roi_voxels"] == pytest.approx(300, rel=0.05)
    with h5py.File(root / nsd.betas_key(1, 1), "r") as f:
        ds = f["betas"]
        assert ds.shape == (750, 18, 24, 20) and ds.dtype == np.int16 and ds.chunks == (750, 1, 1, 1)
        assert ds.compression is None
        x = ds[:].astype(np.float64) / 300
    assert (x[:, ~brain.T] == 0).all()
    # ROI voxels: gain * (unit-variance signal + unit-variance noise); other brain voxels: gain * noise
    roi_var = x[:, (roi == 1).T].var(0).mean()
    other_var = x[:, brain.T & (roi != 1).T].var(0).mean()
    assert other_var == pytest.approx(4.0, rel=0.05)
    assert roi_var / other_var == pytest.approx(2.0, rel=0.1)


def test_the_caption_zip_has_cocos_members_and_five_captions_of_every_image(bucket):
    """COCO's zip in miniature: captions_fetch reads it as it would COCO's own (members, format)."""
    import json
    import zipfile

    root, meta = bucket
    info = pd.read_csv(root / nsd.STIM_INFO, index_col=0)
    with zipfile.ZipFile(root / rehearsal.CAPTIONS_KEY) as zf:
        assert sorted(zf.namelist()) == ["annotations/captions_train2017.json", "annotations/captions_val2017.json"]
        docs = {split: json.loads(zf.read(f"annotations/captions_{split}.json")) for split in ("train2017", "val2017")}
    for split, doc in docs.items():
        coco_ids = set(info.loc[info["cocoSplit"] == split, "cocoId"].tolist())
        assert {im["id"] for im in doc["images"]} == coco_ids
        per_image = pd.Series([a["image_id"] for a in doc["annotations"]]).value_counts()
        assert set(per_image.index) == coco_ids and (per_image == 5).all()
        assert all(isinstance(a["caption"], str) and a["caption"].strip() for a in doc["annotations"][:1000])
    ids = [a["id"] for doc in docs.values() for a in doc["annotations"]]
    assert len(ids) == len(set(ids)) == 5 * 73_000  # annotation ids unique across both files, as COCO's


def test_a_stored_image_is_captioned_as_it_was_made(tmp_path):
    """A stored image's captions name what its attributes say (upside down here); an image never
    stored gets captions all the same."""
    import json
    import zipfile

    info = pd.DataFrame({"cocoId": [11, 12, 13], "cocoSplit": ["train2017", "val2017", "train2017"]})
    from braid import synthetic

    info = pd.DataFrame({"cocoId": [11, 12, 13], "cocoSplit": ["train2017", "val2017", "train2017"]})
    category = synthetic.CATEGORIES.index("coffee")
    made = {1: {"category": category, "share": 0.9, "upside_down": True, "gains": [1.0, 1.0, 1.0]}}
    path = tmp_path / "annotations_trainval2017.zip"
    rehearsal.write_caption_zip(path, info, made)
    with zipfile.ZipFile(path) as zf:
        val = json.loads(zf.read("annotations/captions_val2017.json"))
        train = json.loads(zf.read("annotations/captions_train2017.json"))
    assert len(val["annotations"]) == 5 and all(a["image_id"] == 12 for a in val["annotations"])
    # every caption names the coffee photograph (each caption draws one of its category's nouns)
    assert all(any(w in a["caption"].lower() for w in ("coffee", "espresso")) for a in val["annotations"])
    assert any("upside down" in a["caption"] for a in val["annotations"])
    assert sorted({a["image_id"] for a in train["annotations"]}) == [11, 13]


def test_the_real_volume_gets_subj01s_nsdgeneral_size():
    rois = rehearsal.rois_of_size(rehearsal.VOLUME, np.random.default_rng(0), rehearsal.ROI_VOXELS)
    assert rois["nsdgeneral"].shape == (81, 104, 83)
    # the ROI is cut at a quantile of a grid coordinate, which has ties: within 0.5 % of 15,724
    assert int((rois["nsdgeneral"] == 1).sum()) == pytest.approx(15_724, rel=0.005)


def test_extrapolation_scales_time_by_each_rules_unit():
    G, C = rehearsal.GRADIENT, rehearsal.CLOSED_FORM
    per_rule = pd.DataFrame({"rule": ["latents_encode", G, C, "reconstruct_img2img", "model_fetch"],
                             "jobs": [1, 4, 5, 5, 1], "max_s": [100.0, 20.0, 10.0, 60.0, 50.0],
                             "max_rss_mb": [3000.0, 2500.0, 4000.0, 9000.0, 10000.0]})
    run = {"sessions": 2, "images": 80, "trials": 64, "epochs": 2, "test_images": 8, "steps": 4}
    full = {"sessions": 40, "images": 10_000, "trials": 27_000, "epochs": 200, "test_images": 1_000, "steps": 25}
    out = rehearsal.extrapolate(per_rule, run, full, voxels=15_724).set_index("rule")
    assert out.loc["latents_encode", "full_s"] == pytest.approx(100 * 10_000 / 80)
    assert out.loc[G, "full_s"] == pytest.approx(20 * (27_000 * 200) / (64 * 2))
    assert out.loc["reconstruct_img2img", "full_s"] == pytest.approx(60 * (1_000 * 25) / (8 * 4))
    assert out.loc["model_fetch", "full_s"] == 50 and out.loc["model_fetch", "factor"] == 1
    assert np.isnan(out.loc[C, "full_s"])  # not linear in trials: not extrapolated
    # memory: measured, plus the training data a gradient-trained encoder holds at full scale (float32, twice)
    assert out.loc[G, "full_rss_mb"] == pytest.approx(2500 + (27_000 - 64) * (15_724 + 16_384) * 8 / 2**20)
    # closed form: RidgePath's arrays at full scale, float64 (n x p data, two k x k, n x k, p x k, k x d,
    # n x d with k = p = 15,724), and the p x d weights (float64 + float32), x 1.3 + 1,500 MB
    n, p, d = 27_000, 15_724, 16_384
    floats = n * p + 2 * p * p + n * p + p * p + p * d + n * d
    assert out.loc[C, "full_rss_mb"] >= (1500 + (8 * floats + 12 * p * d) / 2**20) * 1.3
    assert out.loc["latents_encode", "full_rss_mb"] == 3000


def test_the_semantic_routes_rules_scale_with_their_own_roi_and_targets():
    SG, SC = rehearsal.SEMANTIC_GRADIENT, rehearsal.SEMANTIC_CLOSED_FORM
    per_rule = pd.DataFrame({"rule": [SG, SC, "semantic_encode", "reconstruct_conditioning"], "jobs": [1, 4, 1, 2],
                             "max_s": [6.0, 5.0, 130.0, 20.0], "max_rss_mb": [1500.0, 2000.0, 6000.0, 6500.0]})
    run = {"sessions": 2, "images": 64, "trials": 105, "epochs": 2, "test_images": 6, "steps": 4}
    full = rehearsal.FULL
    out = rehearsal.extrapolate(per_rule, run, full, semantic=(7_000, 1_536)).set_index("rule")
    assert out.loc[SG, "full_s"] == pytest.approx(6 * (27_000 * 200) / (105 * 2))
    assert out.loc["semantic_encode", "full_s"] == pytest.approx(130 * 10_000 / 64)
    assert out.loc["reconstruct_conditioning", "full_s"] == pytest.approx(20 * 1_000 / 6)
    assert np.isnan(out.loc[SC, "full_s"])
    # the semantic MLP holds 27,000 trials of 7,000 voxels and 1,280 + 256 targets (float32, twice)
    assert out.loc[SG, "full_rss_mb"] == pytest.approx(1500 + (27_000 - 105) * (7_000 + 1_536) * 8 / 2**20)
    n, p, d = 27_000, 7_000, 1_536  # RidgePath at full scale, float64, x 1.3 + 1,500 MB (as above)
    floats = n * p + 2 * p * p + n * p + p * p + p * d + n * d
    assert out.loc[SC, "full_rss_mb"] >= (1500 + (8 * floats + 12 * p * d) / 2**20) * 1.3
    assert out.loc["semantic_encode", "full_rss_mb"] == 6000
    # without the ROI's size the memory stays as measured
    alone = rehearsal.extrapolate(per_rule, run, full).set_index("rule")
    assert alone.loc[SG, "full_rss_mb"] == 1500 and alone.loc[SC, "full_rss_mb"] == 2000


def test_the_semantic_shape_is_the_masked_roi_and_the_largest_target(tmp_path):
    """Voxels from the run's semantic betas; targets: SDXL's 1,280-d pooled embedding, plus the
    token components when an encoder targets the tokens."""
    import json

    array = tmp_path / "results" / "subj01" / "semantic" / "betas.zarr" / "betas"
    config = {"semantic": {"token_components": 256}, "semantic_sweep": {},
              "semantic_encoders": {"ridge": {"kind": "ridge"}, "ridge-tokens": {"kind": "ridge", "target": "tokens"}}}
    assert rehearsal.semantic_shape(tmp_path, config) is None  # no semantic route in the run
    array.mkdir(parents=True)
    (array / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "array", "shape": [105, 7_123]}))
    assert rehearsal.semantic_shape(tmp_path, config) == (7_123, 1_280 + 256)
    del config["semantic_encoders"]["ridge-tokens"]
    assert rehearsal.semantic_shape(tmp_path, config) == (7_123, 1_280)


def test_declared_memory_is_read_from_a_dry_run_and_set_beside_the_peaks():
    dry = """
rule encoder_train:
    input: results/subj01/betas.zarr/zarr.json
    output: results/subj01/ridge/encoder.safetensors
    log: logs/subj01/ridge/train.log
    jobid: 12
    benchmark: logs/benchmark/encoder_train/subj01/ridge/train.tsv
    wildcards: subject=subj01, encoder=ridge
    threads: 8
    resources: tmpdir=/tmp, mem_mb=5888, mem_mib=5616, runtime=720, gpu=1

rule encoder_train:
    benchmark: logs/benchmark/encoder_train/subj01/mlp/train.tsv
    resources: tmpdir=/tmp, mem_mb=3840, runtime=720

localrule nsd_fetch:
    benchmark: logs/benchmark/nsd_fetch/nsd/fetch/x.tsv
    resources: tmpdir=/tmp
"""
    declared = rehearsal.declared_memory(dry)
    assert declared == {"encoder_train/subj01/ridge/train": 5888, "encoder_train/subj01/mlp/train": 3840}
    jobs = pd.DataFrame({"rule": ["encoder_train"] * 3 + ["nsd_fetch"],
                         "job": ["subj01/ridge/train", "subj01/mlp/train", "subj01/mlp-h8/train", "nsd/fetch/x"],
                         "s": [10.0, 8.0, 5.0, 1.0], "max_rss": [4273.0, 2673.0, 900.0, 129.0], "cpu_time": [1.0] * 4})
    jobs = rehearsal.with_declared(jobs, {**declared, "encoder_train/subj01/mlp-h8/train": 600})
    semantic = pd.DataFrame({"rule": ["semantic_train"] * 3, "job": ["subj01/ridge-tokens/train", "subj01/mlp/train",
                                                                     "subj01/lowrank/train"],
                             "s": [3.0, 4.0, 2.0], "max_rss": [900.0, 800.0, 700.0], "cpu_time": [1.0] * 3})
    jobs = pd.concat([jobs, semantic], ignore_index=True)
    table = rehearsal.rule_table(jobs, {"ridge": "ridge", "mlp": "mlp", "mlp-h8": "mlp"},
                                 {"ridge-tokens": "ridge", "mlp": "mlp", "lowrank": "lowrank"}).set_index("rule")
    assert table.loc[rehearsal.CLOSED_FORM, "jobs"] == 1 and table.loc[rehearsal.GRADIENT, "jobs"] == 2
    # the semantic mlp is its own gradient row, not the latent route's
    assert table.loc[rehearsal.SEMANTIC_CLOSED_FORM, "jobs"] == 2 and table.loc[rehearsal.SEMANTIC_GRADIENT, "jobs"] == 1
    assert "semantic_train" not in table.index
    # the gradient rule's tightest job is mlp-h8, over its 600 MB: the table must say so
    assert table.loc[rehearsal.GRADIENT, "mem_mb"] == 600
    assert table.loc[rehearsal.GRADIENT, "peak_over_declared"] == pytest.approx(900 / 600)
    assert table.loc[rehearsal.CLOSED_FORM, "peak_over_declared"] == pytest.approx(4273 / 5888)
    assert np.isnan(table.loc["nsd_fetch", "mem_mb"])
    run = {"sessions": 2, "images": 64, "trials": 105, "epochs": 2, "test_images": 6, "steps": 4}
    text = rehearsal.markdown(rehearsal.extrapolate(table.reset_index(), run, rehearsal.FULL))
    assert "UNDER-DECLARED" in [line for line in text.splitlines() if rehearsal.GRADIENT in line][0]
    assert "UNDER-DECLARED" not in [line for line in text.splitlines() if rehearsal.CLOSED_FORM in line][0]


def test_a_killed_script_cleans_up_after_exit_on_sigterm(tmp_path):
    """SIGTERM unwinds: the temporary folder of a benchmark or the rehearsal is removed (code 143)."""
    import signal
    import subprocess
    import sys

    script = ("import sys, tempfile, time\nfrom braid.common import exit_on_sigterm\nexit_on_sigterm()\n"
              f"with tempfile.TemporaryDirectory(dir={str(tmp_path)!r}) as tmp:\n"
              "    open(tmp + '/big', 'w').write('x')\n    print(tmp, flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    folder = proc.stdout.readline().strip()
    assert folder and (tmp_path / folder).exists()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    assert not list(tmp_path.iterdir())
