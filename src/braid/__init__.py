"""BRAID: Brain Representation to Artificial Image via Diffusion.

One module per workflow stage: :mod:`braid.nsd` (keys, design files, ROI masks) with
:mod:`braid.transfer` (S3 and mirror fetches, resumable),
:mod:`braid.synthetic` (a format-exact synthetic NSD), :mod:`braid.models` (SSD-1B or a tiny
stand-in), :mod:`braid.betas`, :mod:`braid.latents`, :mod:`braid.encoder`,
:mod:`braid.reconstruct` and :mod:`braid.evaluate`.
"""

__version__ = "0.1.0"
