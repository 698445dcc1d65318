"""Integrity of what BRAID writes: chunk checksums in every Zarr store and a manifest in every
folder of images, checked by the jobs that read them and by ``python -m braid.verify``.

- **Zarr stores** are written through :func:`new_group` and :func:`new_array`: every chunk ends
  in a CRC-32C checksum (zarr v3's ``crc32c`` codec, after zstd), every chunk is written even
  where it holds only the fill value (so a missing chunk is damage, not zeros), and the root's
  attributes name the rule that wrote the store. :func:`open_store` opens a store for reading;
  any read that fails (a checksum mismatch, a truncated or missing chunk) ends in one
  :class:`~braid.common.BraidError` naming the store, the damaged chunks and the
  ``snakemake --forcerun`` target that rebuilds it.
- **Folders** of files (reconstructed images) get a manifest written last
  (:data:`MANIFEST`: every file's name, size and SHA-256, and the rule); :func:`check_folder`
  compares the folder with it and names a missing, added, resized or replaced file.

A Snakemake job's rule reaches the writers through the ``BRAID_RULE`` variable that
:func:`braid.common.snakemake_job` sets.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .common import BraidError

MANIFEST = "manifest.json"
RULE_ATTR = "braid_rule"  # the rule that wrote a store (root attribute) or a folder (manifest key)
# rules whose store is a cache shared by subjects and append-only: repaired by rebuilding it whole
SHARED_CACHE_RULES = ("latents_encode", "semantic_encode")
_SKIP = (MANIFEST, ".snakemake_timestamp")  # Snakemake adds a timestamp file to directory() outputs


def current_rule() -> str | None:
    """The rule of the Snakemake job this process runs (None outside a job)."""
    return os.environ.get("BRAID_RULE") or None


# --- Zarr stores --------------------------------------------------------------------------------


def _codecs() -> dict:
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return {"compressors": (ZstdCodec(level=3), Crc32cCodec()), "config": {"write_empty_chunks": True}}


def new_group(path: str | os.PathLike, rule: str | None = None):
    """A new Zarr group at ``path`` (mode ``w``) whose attributes name the rule that writes it."""
    import zarr

    root = zarr.open_group(Path(path), mode="w")
    root.attrs[RULE_ATTR] = rule or current_rule() or "unknown"
    return root


def new_array(group, name: str, **kwargs):
    """``group.create_array(name, ...)`` with checksummed chunks, every chunk written."""
    return group.create_array(name, **_codecs(), **kwargs)


def _checksummed(arr) -> bool:
    return any(type(c).__name__ == "Crc32cCodec" for c in arr.metadata.codecs)


def _arrays(root):
    import zarr

    return [a for _, a in root.members(max_depth=None) if isinstance(a, zarr.Array)]


def _chunks(root, store: Path):
    """(array, chunk coordinates, chunk file) of every chunk a reader may read: rows past a shared
    cache's ``n_committed`` (an interrupted append, which its readers ignore) are left out."""
    committed = root.attrs.get("n_committed")
    for arr in _arrays(root):
        for coords in np.ndindex(*arr.cdata_shape):
            if committed is not None and arr.ndim and coords[0] * arr.chunks[0] >= int(committed):
                continue
            yield arr, coords, f"{arr.path}/{arr.metadata.encode_chunk_key(coords)}"


def _missing(root, store: Path) -> list[str]:
    # only checksummed arrays write every chunk; older stores left fill-value chunks unwritten
    return [f"chunk {key} is missing" for arr, _, key in _chunks(root, store)
            if _checksummed(arr) and not (store / key).is_file()]


def store_damage(store: str | os.PathLike) -> list[str]:
    """Every problem of the store at ``store``: unreadable metadata, missing or damaged chunks
    (each chunk is read and its checksum checked). Empty when the store is intact."""
    import zarr

    store = Path(store)
    try:
        root = zarr.open_group(store, mode="r")
        problems = _missing(root, store)
    except Exception as err:  # noqa: BLE001 - any failure here is the damage being reported
        return [f"its metadata cannot be read ({type(err).__name__}: {err})"]
    for arr, coords, key in _chunks(root, store):
        if (store / key).is_file():
            try:
                arr.blocks[coords]
            except Exception as err:  # noqa: BLE001
                problems.append(f"chunk {key} is damaged ({type(err).__name__}: {err})")
    return problems


def store_checksummed(store: str | os.PathLike) -> bool:
    """Whether every array of the store carries chunk checksums (stores of older BRAIDs do not)."""
    import zarr

    try:
        return all(_checksummed(a) for a in _arrays(zarr.open_group(Path(store), mode="r")))
    except Exception:  # noqa: BLE001 - unreadable metadata is reported by store_damage
        return True


def store_rule(store: str | os.PathLike) -> str | None:
    """The rule named in the store's root attributes (None when unreadable or not recorded)."""
    try:
        attrs = json.loads((Path(store) / "zarr.json").read_text()).get("attributes", {})
    except (OSError, ValueError):
        return None
    rule = attrs.get(RULE_ATTR)
    return None if rule in (None, "unknown") else rule


def store_repair(store: str | os.PathLike, rule: str | None) -> str:
    """The command that rebuilds the store: forcerun its output file (a shared cache: rebuilt whole)."""
    store = Path(store)
    if rule in SHARED_CACHE_RULES:
        return f"rm -r {store} && snakemake --forcerun {rule}"
    return f"snakemake --forcerun {store / 'zarr.json'}"


def damage_message(path: str | os.PathLike, problems: list[str], rule: str | None, repair: str) -> str:
    shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    writer = f"It was written by rule {rule}; rebuild" if rule else "Rebuild"
    return (f"{path} is damaged: {shown}. {writer} it with `{repair}` (then rerun as before); "
            "`python -m braid.verify` checks every output of the run.")


def _raise_damaged(store: Path, err: Exception, hint: str | None):
    problems = store_damage(store) or [f"a read failed ({type(err).__name__}: {err})"]
    rule = store_rule(store) or hint
    raise BraidError(damage_message(store, problems, rule, store_repair(store, rule))) from err


class _Checked:
    """Reads through a store's arrays; a failed read becomes one :class:`BraidError`."""

    def __init__(self, obj, store: Path, hint: str | None):
        self._obj, self._store, self._hint = obj, store, hint

    def _guard(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except BraidError:
            raise
        except KeyError:
            raise
        except Exception as err:  # noqa: BLE001
            _raise_damaged(self._store, err, self._hint)

    def __getattr__(self, name):
        return getattr(self._obj, name)

    def __contains__(self, item):
        return item in self._obj


class CheckedArray(_Checked):
    def __getitem__(self, selection):
        return self._guard(self._obj.__getitem__, selection)

    def get_orthogonal_selection(self, selection, **kwargs):
        return self._guard(self._obj.get_orthogonal_selection, selection, **kwargs)

    def __array__(self, dtype=None, copy=None):
        data = self._guard(self._obj.__getitem__, ...)
        return np.asarray(data, dtype=dtype)

    def __len__(self):
        return len(self._obj)


class CheckedGroup(_Checked):
    def __getitem__(self, name):
        import zarr

        obj = self._obj[name]
        cls = CheckedArray if isinstance(obj, zarr.Array) else CheckedGroup
        return cls(obj, self._store, self._hint)


def open_store(path: str | os.PathLike, rule: str | None = None) -> CheckedGroup:
    """Open the store at ``path`` (its folder or its ``zarr.json``) for reading.

    ``rule``: the rule that writes it, for the message when the store does not record one.
    Unreadable metadata, and any later failed read, end in a :class:`BraidError` naming the
    store, its damaged chunks and the repair.
    """
    import zarr

    store = Path(path)
    store = store.parent if store.name == "zarr.json" else store
    if not (store / "zarr.json").is_file():
        target = rule if rule in SHARED_CACHE_RULES else store / "zarr.json"
        writer = f"rule {rule}" if rule else "the rule that writes it"
        raise BraidError(f"{store}: no Zarr store here (zarr.json is missing); run {writer} "
                         f"(`snakemake --forcerun {target}`)")
    try:
        root = zarr.open_group(store, mode="r")
        missing = _missing(root, store)
    except Exception as err:  # noqa: BLE001
        _raise_damaged(store, err, rule)
    if missing:  # zarr would read a missing chunk as its fill value
        writer = store_rule(store) or rule
        raise BraidError(damage_message(store, missing, writer, store_repair(store, writer)))
    return CheckedGroup(root, store, rule)


# --- folders ------------------------------------------------------------------------------------


def open_append_store(store: str | os.PathLike, fmt: str, identity: dict, arrays: dict, attrs: dict,
                      what: str = "data"):
    """Open (or create) an append-only cache ``store`` after checking that it holds ``identity``'s data.

    ``arrays``: name -> (row shape, rows per chunk, dtype); each array starts with 0 rows and the
    caller appends, then commits by raising its ``n_committed`` (and any other counter) attribute:
    rows past a counter are an interrupted append and are ignored. A new store appears whole or
    not at all; an existing one of another format, identity or row shape is refused.
    """
    import zarr

    from .common import atomic_output

    store = Path(store)
    if (store / "zarr.json").is_file():
        root = zarr.open_group(store, mode="r+")
        have = root.attrs.get("identity")
        if root.attrs.get("format") != fmt or have != identity:
            raise BraidError(
                f"{store}: holds {what} of {have}, not {identity}; {what} of other settings are never mixed. "
                "Use another store path (the workflow names stores by these settings) or delete it."
            )
        for name, (row, _, _) in arrays.items():
            if tuple(root[name].shape[1:]) != tuple(row):
                raise BraidError(f"{store}: {name} has rows of shape {root[name].shape[1:]}, these settings give {row}")
        return root
    with atomic_output(store) as tmp:
        root = new_group(tmp)
        for name, (row, chunk, dtype) in arrays.items():
            new_array(root, name, shape=(0, *row), chunks=(chunk, *row), dtype=dtype,
                      **({"fill_value": -1} if np.dtype(dtype).kind == "i" else {}))
        root.attrs.update({"format": fmt, "identity": identity, "n_committed": 0, **attrs})
    return zarr.open_group(store, mode="r+")


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _listing(folder: Path) -> dict[str, Path]:
    return {str(f.relative_to(folder)): f for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name not in _SKIP and not f.name.startswith(".tmp-")}


def write_folder_manifest(folder: str | os.PathLike, rule: str | None = None) -> dict:
    """Write :data:`MANIFEST` into ``folder``, after its files: their names, sizes and SHA-256.

    Call it last, inside the job's temporary folder, so a folder with a manifest is complete.
    """
    folder = Path(folder)
    files = {name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)} for name, p in _listing(folder).items()}
    manifest = {RULE_ATTR: rule or current_rule() or "unknown", "files": files}
    tmp = folder / f".tmp-{MANIFEST}"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)
    return manifest


def folder_rule(folder: str | os.PathLike) -> str | None:
    try:
        rule = json.loads((Path(folder) / MANIFEST).read_text()).get(RULE_ATTR)
    except (OSError, ValueError, AttributeError):
        return None
    return None if rule in (None, "unknown") else rule


def folder_damage(folder: str | os.PathLike) -> list[str]:
    """How ``folder`` differs from its manifest: missing, added, resized or changed files."""
    folder = Path(folder)
    if not folder.is_dir():
        return ["the folder is missing"]
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return [f"its {MANIFEST} is missing (the job that wrote it did not finish, or the file was removed)"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"its {MANIFEST} cannot be read ({err})"]
    have = _listing(folder)
    problems = [f"{name} is missing" for name in files if name not in have]
    problems += [f"{name} is not in the manifest" for name in have if name not in files]
    for name, want in files.items():
        if name in have:
            size = have[name].stat().st_size
            if size != want["bytes"]:
                problems.append(f"{name} has {size} bytes, not {want['bytes']}")
            elif file_sha256(have[name]) != want["sha256"]:
                problems.append(f"{name} was changed (its SHA-256 differs)")
    return problems


def check_folder(folder: str | os.PathLike, rule: str | None = None) -> None:
    """Raise one :class:`BraidError` when ``folder`` does not match its manifest."""
    problems = folder_damage(folder)
    if problems:
        writer = folder_rule(folder) or rule
        raise BraidError(damage_message(folder, problems, writer, f"snakemake --forcerun {folder}"))
