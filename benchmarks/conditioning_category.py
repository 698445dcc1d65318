"""What conditioning on meaning adds to the category readout, over more seeds than the demo runs.

    .venv/bin/python benchmarks/conditioning_category.py [--run .] [--subject subj01] [--latent ridge]
                        [--semantic ridge-tokens] [--seeds 10] [--strength 0.8] [--guidance 7.5]

Reads a finished demo run (``--run``, the folder holding ``results/`` and ``resources/``): its
model, the latent encoder's test predictions and the conditioning stores. For each conditioning
it runs ``braid.reconstruct.reconstruct`` (the img2img rule's code) at one strength and guidance
scale over ``--seeds`` seeds, into a temporary folder, and scores each image with the workflow's
category readout (``braid.evaluate.category_pool``, ``category_descriptor``, ``nearest_category``).

  none          the fixed prompt                                                         <- baseline
  predicted     the semantic encoder's predicted embeddings
  retrieved     the nearest bank caption
  true-caption  the image's own captions (the semantic ceiling)

Prints each conditioning's readout (mean over images of the share of seeds read right, s.e.m.
over images) and its difference from ``none``, and true-caption's from the other two, paired
over images. The demo's one seed cannot separate differences under about 0.15; ten can.
"""

from __future__ import annotations

import argparse
import glob
import tempfile
from pathlib import Path

import numpy as np
import yaml


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("."))
    parser.add_argument("--subject", default="subj01")
    parser.add_argument("--latent", default="ridge")
    parser.add_argument("--semantic", default="ridge-tokens")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--strength", type=float, default=0.8)
    parser.add_argument("--guidance", type=float, default=7.5)
    args = parser.parse_args()

    from braid.evaluate import category_descriptor, category_pool, load_images, nearest_category
    from braid.metric_networks import to_256
    from braid.reconstruct import reconstruct

    run, subject = args.run.resolve(), args.subject
    import braid.config

    schema = yaml.safe_load((run / "config" / "schema.yaml").read_text())
    config = braid.config.fill_defaults(yaml.safe_load((run / "config" / "config.yaml").read_text()), schema)
    settings = braid.config.img2img_settings(config)
    model = run / braid.config.model_dir(config["model"])
    stimuli = glob.glob(str(run / "resources" / "**" / "nsd_stimuli.hdf5"), recursive=True)
    info = glob.glob(str(run / "resources" / "**" / "nsd_stim_info_merged.csv"), recursive=True)
    if not (model.is_dir() and stimuli and info):
        raise SystemExit(f"{run}: no finished demo run here ({model}, the stimuli and their info); run `make demo` "
                         "first")
    results = run / "results" / subject
    pool = category_pool(stimuli[0], results / "trials.parquet", info[0])
    if pool is None:
        raise SystemExit(f"{info[0]}: no category column (only the synthetic NSD has one)")
    descriptors, pool_categories, by_id = pool
    conditionings = {"none": None, **{f"{mode}-{args.semantic}": results / "conditioning" / f"{mode}-{args.semantic}.zarr"
                                      for mode in ("predicted", "retrieved")},
                     "true-caption": results / "conditioning" / "true-caption.zarr"}
    for name, path in conditionings.items():
        if path is not None and not path.exists():
            raise SystemExit(f"{path}: missing; the demo's config must condition {args.latent} with {args.semantic}")
    right = {}
    with tempfile.TemporaryDirectory(prefix="braid-bench-category-") as tmp:
        for name, path in conditionings.items():
            per_seed = []
            for seed in range(args.seeds):
                out = Path(tmp) / name / f"seed-{seed}"
                reconstruct(str(results / args.latent / "predictions.zarr"), model, out, strength=args.strength,
                            seed=seed, params=settings, guidance_scale=args.guidance,
                            conditioning_path=str(path) if path else None)
                ids = np.array(sorted(int(p.stem) for p in out.glob("*.png")))
                guess = nearest_category(category_descriptor(to_256(load_images(out, ids))), descriptors,
                                         pool_categories)
                per_seed.append(guess == by_id.loc[ids].to_numpy())
            right[name] = np.mean(per_seed, axis=0)  # per image: the share of seeds read right

    def sem(values):
        return float(np.std(values, ddof=1) / np.sqrt(len(values)))

    n = len(right["none"])
    print(f"category readout, {args.latent}'s latent at strength {args.strength}, guidance {args.guidance}, "
          f"{n} images x {args.seeds} seeds (mean ± s.e.m. over images; chance {1 / 14:.2f}):")
    for name, values in right.items():
        print(f"  {name:28s} {values.mean():.3f} ± {sem(values):.3f}")
    print("paired differences:")
    for name, values in right.items():
        if name != "none":
            d = values - right["none"]
            print(f"  {name} - none: {d.mean():+.3f} ± {sem(d):.3f}")
    for name in list(conditionings)[1:3]:
        d = right["true-caption"] - right[name]
        print(f"  true-caption - {name}: {d.mean():+.3f} ± {sem(d):.3f}")


if __name__ == "__main__":
    main()
