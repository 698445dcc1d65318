"""Locate an HDF5 dataset's bytes with ranged reads only — the basis of ROI-only fetching.

NSD's betas files keep each voxel's trials in one uncompressed chunk, so the bytes of an ROI
are a few thousand small ranges of a 1 GB object. This module reads just enough of the file's
metadata (superblock, root group, the dataset's object header, the chunk B-tree nodes that
cover the wanted chunks) through any ``reader(offset, size) -> bytes`` to answer: where are
the chunks at these coordinates? It handles what HDF5 1.8-compatible writers (h5py's default,
MATLAB's ``h5create``) produce: superblock v0-v3, v1/v2 object headers, layout message v3 with
a version-1 chunk B-tree, or contiguous storage. Anything else raises :class:`LayoutError`,
and callers fall back to downloading the whole object.
"""

from __future__ import annotations

import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

Reader = Callable[[int, int], bytes]
SIGNATURE = b"\x89HDF\r\n\x1a\n"
HEAD_BYTES = 64 * 1024  # read first, in one request: writers put the file's metadata at its start
# merge gaps tried for one level of chunk-index leaves (bytes); the largest within the budget wins
INDEX_GAPS = (0, 16 * 1024, 64 * 1024, 128 * 1024, 256 * 1024, 1024 * 1024)
INDEX_BUDGET = 5  # a merged leaf level may read up to this many times (leaf bytes + wanted chunks' bytes),
INDEX_SHARE = 11  # and at most 1/11 of the file (with the rest, a ROI-only fetch stays under 10 % of the bytes)
INDEX_MAX_BYTES = 256 * 2**20  # and at most this much, which the cache holds in memory (imgBrick is 39.6 GB)


class LayoutError(RuntimeError):
    """The file's layout is not one this module can map to byte ranges."""


@dataclass
class DatasetLayout:
    shape: tuple[int, ...]
    dtype: np.dtype
    layout: str  # "chunked" or "contiguous"
    address: int  # B-tree root (chunked) or data start (contiguous)
    chunk_shape: tuple[int, ...] | None
    filtered: bool


def stored_end_of_file(head: bytes) -> int | None:
    """The file size an HDF5 file's superblock records (base address + end-of-file address), from
    its first 128 bytes; ``None`` if ``head`` is not an HDF5 superblock this module reads."""
    if head[:8] != SIGNATURE or len(head) < 64:
        return None
    version = head[8]
    if version in (0, 1):
        so = head[13]
        pos = 24 + (4 if version == 1 else 0)  # base, free-space, end-of-file, driver-info addresses
    elif version in (2, 3):
        so = head[9]
        pos = 12  # base, superblock extension, end-of-file, root object header addresses
    else:
        return None
    base = int.from_bytes(head[pos : pos + so], "little")
    return base + int.from_bytes(head[pos + 2 * so : pos + 3 * so], "little")


def check_not_truncated(head: bytes, size: int, label: str, fix: str) -> None:
    """Refuse an HDF5 file whose superblock records more bytes than it has (a cut-short copy)."""
    from .common import BraidError

    eof = stored_end_of_file(head)
    if eof is not None and eof > size:
        raise BraidError(f"{label}: truncated: its HDF5 superblock says the file is {eof:,} bytes long, but it has "
                         f"{size:,}; {fix}")


class RangeCache:
    """Reads through ``reader`` and keeps what :meth:`read_many` fetched, so that a later read
    inside a kept block costs no request.

    Over a link with latency the number of requests, not bytes, bounds a ROI-only fetch: the
    chunk index of an NSD betas file is some 800-1,400 small B-tree leaves spread among the data,
    each near the chunks it indexes. Reading one level of leaves in merged requests (ranges
    closer than a gap become one) brings most wanted chunks with it, in a hundred requests or so.
    """

    def __init__(self, reader: Reader, parallel: int = 16):
        self._reader, self.parallel = reader, parallel
        self._starts: list[int] = []
        self._blocks: list[bytes] = []
        self._lock = threading.Lock()

    def cached(self, offset: int, size: int) -> bytes | None:
        """The bytes if a kept block holds them all, else None (no request)."""
        import bisect

        with self._lock:
            i = bisect.bisect_right(self._starts, offset) - 1
            if i >= 0 and offset + size <= self._starts[i] + len(self._blocks[i]):
                rel = offset - self._starts[i]
                return self._blocks[i][rel : rel + size]
        return None

    def read(self, offset: int, size: int) -> bytes:
        hit = self.cached(offset, size)
        return hit if hit is not None else self._reader(offset, size)

    def read_many(self, ranges: list[tuple[int, int]], max_gap: int = 0) -> list[bytes]:
        """The bytes of each (offset, size); those not kept are fetched in merged requests
        (ranges less than ``max_gap`` bytes apart share one), ``parallel`` at a time, and kept."""
        out = [self.cached(o, n) for o, n in ranges]
        spans: list[list[int]] = []
        for o, n in sorted({r for r, d in zip(ranges, out) if d is None}):
            if spans and o <= spans[-1][1] + max_gap:
                spans[-1][1] = max(spans[-1][1], o + n)
            else:
                spans.append([o, o + n])
        if spans:
            with ThreadPoolExecutor(min(self.parallel, len(spans))) as pool:
                blocks = list(pool.map(lambda sp: self._reader(sp[0], sp[1] - sp[0]), spans))
            with self._lock:
                for (start, _), block in zip(spans, blocks):
                    self._keep(start, block)
        return [d if d is not None else self.read(o, n) for (o, n), d in zip(ranges, out)]

    def _keep(self, start: int, block: bytes) -> None:
        """Add a block, united with every kept block it overlaps or touches: kept blocks never overlap,
        so the block that starts last before an offset is the only one that can hold it."""
        import bisect

        end = start + len(block)
        lo = bisect.bisect_right(self._starts, start) - 1
        if lo < 0 or self._starts[lo] + len(self._blocks[lo]) < start:
            lo += 1  # the block before ends before this one starts
        hi = bisect.bisect_right(self._starts, end)  # blocks starting at or before this one's end
        if lo < hi:
            if self._starts[lo] < start:
                block = self._blocks[lo][: start - self._starts[lo]] + block
                start = self._starts[lo]
            last = self._starts[hi - 1] + len(self._blocks[hi - 1])
            if last > end:
                block = block + self._blocks[hi - 1][len(self._blocks[hi - 1]) - (last - end) :]
        self._starts[lo:hi] = [start]
        self._blocks[lo:hi] = [block]


def merge_gap(offsets: list[int], size: int, budget: int, gaps=INDEX_GAPS) -> int:
    """The largest of ``gaps`` whose merged ranges (``size`` bytes at each offset) total at most ``budget`` bytes."""
    o = np.sort(np.asarray(offsets, np.int64))
    best = gaps[0]
    for gap in gaps:
        if o.size == 0:
            break
        runs = coalesce(o, size, gap)
        if sum(length for _, length, _ in runs) <= budget:
            best = gap
    return best


class HDF5Ranges:
    """Metadata of one HDF5 file, read lazily through ``reader``; counts the bytes it read.

    With a :class:`RangeCache` (``cache``), the file's first :data:`HEAD_BYTES` are read in one
    request (the superblock, root group and dataset headers usually lie there), and each level of
    the chunk index in merged requests (:meth:`chunk_addresses`); the cache keeps what was read.
    """

    def __init__(self, reader: Reader, parallel: int = 16, cache: RangeCache | None = None, size: int | None = None):
        self._read = cache.read if cache is not None else reader
        self.cache, self.size = cache, size
        self.parallel = parallel
        self.metadata_bytes = 0
        self._lock = threading.Lock()
        if cache is not None:
            cache.read_many([(0, HEAD_BYTES if size is None else min(HEAD_BYTES, size // INDEX_SHARE))])
        head = self.superblock = self.read(0, 128)
        if head[:8] != SIGNATURE:
            raise LayoutError("no HDF5 signature at offset 0 (user blocks are not supported)")
        self.version = head[8]
        if self.version in (0, 1):
            self.so, self.sl = head[13], head[14]
            pos = 24 + (4 if self.version == 1 else 0)
            pos += 4 * self.so  # base, free-space, end-of-file, driver-info addresses
            self.root_entry = head[pos : pos + self.so * 2 + 24]
            self.root_header = self._addr(self.root_entry, self.so)
        elif self.version in (2, 3):
            self.so, self.sl = head[9], head[10]
            self.root_header = self._addr(head, 12 + 3 * self.so)
            self.root_entry = None
        else:
            raise LayoutError(f"superblock version {self.version}")

    # -- primitives -------------------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        data = self._read(offset, size)
        with self._lock:
            self.metadata_bytes += len(data)
        return data

    def _addr(self, buf: bytes, pos: int, size: int | None = None) -> int:
        return int.from_bytes(buf[pos : pos + (size or self.so)], "little")

    # -- object headers ---------------------------------------------------------------------
    def messages(self, address: int) -> list[tuple[int, bytes]]:
        """(type, body) of every message in the object header at ``address``."""
        head = self.read(address, 4096)
        out: list[tuple[int, bytes]] = []
        if head[:4] == b"OHDR":
            flags = head[5]
            pos = 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)
            width = 1 << (flags & 0x03)
            size = int.from_bytes(head[pos : pos + width], "little")
            pos += width
            if pos + size + 4 > len(head):
                head = self.read(address, pos + size + 4)
            blocks = [(head[pos : pos + size], flags & 0x04)]
            while blocks:
                block, order = blocks.pop()
                p = 0
                while p + 4 <= len(block):
                    mtype, msize = block[p], int.from_bytes(block[p + 1 : p + 3], "little")
                    p += 4 + (2 if order else 0)
                    body = block[p : p + msize]
                    p += msize
                    if mtype == 0x10:
                        cont, length = self._addr(body, 0), self._addr(body, self.so, self.sl)
                        chunk = self.read(cont, length)
                        blocks.append((chunk[4:-4], order))  # 'OCHK' ... checksum
                    else:
                        out.append((mtype, body))
            return out
        if head[0] != 1:
            raise LayoutError(f"object header version {head[0]} at {address}")
        count = int.from_bytes(head[2:4], "little")
        size = int.from_bytes(head[8:12], "little")
        if 16 + size > len(head):
            head = self.read(address, 16 + size)
        blocks = [head[16 : 16 + size]]
        while blocks and len(out) < count:
            block = blocks.pop()
            p = 0
            while p + 8 <= len(block):
                mtype = int.from_bytes(block[p : p + 2], "little")
                msize = int.from_bytes(block[p + 2 : p + 4], "little")
                body = block[p + 8 : p + 8 + msize]
                p += 8 + msize
                if mtype == 0x10:
                    blocks.append(self.read(self._addr(body, 0), self._addr(body, self.so, self.sl)))
                out.append((mtype, body))
        return out

    # -- groups -----------------------------------------------------------------------------
    def find(self, name: str) -> int:
        """Object header address of ``name``, a member of the root group."""
        if self.root_entry is not None and int.from_bytes(self.root_entry[2 * self.so : 2 * self.so + 4], "little") == 1:
            btree = self._addr(self.root_entry, 2 * self.so + 8)
            heap = self._addr(self.root_entry, 3 * self.so + 8)
            return self._find_in_symbol_table(btree, heap, name)
        for mtype, body in self.messages(self.root_header):
            if mtype == 0x11:  # symbol table message
                return self._find_in_symbol_table(self._addr(body, 0), self._addr(body, self.so), name)
            if mtype == 0x06:  # link message (compact links)
                flags = body[1]
                p = 2 + (1 if flags & 0x08 else 0) + (8 if flags & 0x04 else 0) + (1 if flags & 0x10 else 0)
                width = 1 << (flags & 0x03)
                length = int.from_bytes(body[p : p + width], "little")
                p += width
                if body[p : p + length].decode() == name and not (flags & 0x08 and body[2] != 0):
                    return self._addr(body, p + length)
        raise LayoutError(f"no object {name!r} in the root group (dense link storage is not supported)")

    def _find_in_symbol_table(self, btree: int, heap: int, name: str) -> int:
        h = self.read(heap, 8 + 2 * self.sl + self.so)
        if h[:4] != b"HEAP":
            raise LayoutError("root group local heap not found")
        data_size = self._addr(h, 8, self.sl)
        names = self.read(self._addr(h, 8 + 2 * self.sl), data_size)
        stack = [btree]
        while stack:
            node = self.read(stack.pop(), 24 + 2 * self.so + 4096)
            if node[:4] == b"SNOD":
                n = int.from_bytes(node[6:8], "little")
                entry = 2 * self.so + 24
                for i in range(n):
                    e = node[8 + i * entry : 8 + (i + 1) * entry]
                    off = self._addr(e, 0)
                    if names[off : names.index(b"\0", off)].decode() == name:
                        return self._addr(e, self.so)
                continue
            if node[:4] != b"TREE":
                raise LayoutError("group B-tree node not found")
            used = int.from_bytes(node[6:8], "little")
            p = 8 + 2 * self.so + self.sl  # after siblings and the first key
            for _ in range(used):
                stack.append(self._addr(node, p))
                p += self.so + self.sl
        raise LayoutError(f"no object {name!r} in the root group")

    # -- datasets ---------------------------------------------------------------------------
    def dataset(self, name: str) -> DatasetLayout:
        shape = dtype = layout = None
        filtered = False
        for mtype, body in self.messages(self.find(name)):
            if mtype == 0x01:  # dataspace
                version, rank = body[0], body[1]
                p = 8 if version == 1 else 4
                shape = tuple(int.from_bytes(body[p + i * self.sl : p + (i + 1) * self.sl], "little") for i in range(rank))
            elif mtype == 0x03:  # datatype
                cls, bits, size = body[0] & 0x0F, body[1], int.from_bytes(body[4:8], "little")
                if cls != 0:
                    raise LayoutError(f"datatype class {cls} (only integers are mapped)")
                dtype = np.dtype(f"{'>' if bits & 1 else '<'}{'i' if bits & 0x08 else 'u'}{size}")
            elif mtype == 0x0B:  # filter pipeline
                filtered = True
            elif mtype == 0x08:  # data layout
                if body[0] != 3:
                    raise LayoutError(f"data layout message version {body[0]} (only 3 is mapped)")
                if body[1] == 1:
                    layout = ("contiguous", self._addr(body, 2), None)
                elif body[1] == 2:
                    rank = body[2]
                    addr = self._addr(body, 3)
                    dims = struct.unpack_from(f"<{rank}I", body, 3 + self.so)
                    layout = ("chunked", addr, tuple(dims[:-1]))
                else:
                    raise LayoutError("compact data layout")
        if shape is None or dtype is None or layout is None:
            raise LayoutError(f"dataset {name!r}: dataspace, datatype or layout message missing")
        return DatasetLayout(shape, dtype, layout[0], layout[1], layout[2], filtered)

    def chunk_addresses(self, ds: DatasetLayout, coords: np.ndarray) -> np.ndarray:
        """Byte address of the chunk starting at each row of ``coords`` (element offsets, C order).

        Walks the version-1 chunk B-tree from the root, one level at a time, reading in
        parallel only the nodes whose key range holds a wanted chunk. Missing chunks get -1.
        """
        if ds.layout != "chunked":
            raise LayoutError("not a chunked dataset")
        rank = len(ds.shape)
        key = 8 + 8 * (rank + 1)
        coords = np.asarray(coords, dtype=np.int64)
        order = np.lexsort(coords.T[::-1])
        wanted = coords[order]
        result = np.full(len(coords), -1, np.int64)
        level = [(ds.address, 0, len(wanted))]  # node, slice of wanted it must resolve
        size = 24 + 2 * self.so + 64 * (key + self.so) + key
        chunk_bytes = int(np.prod(ds.chunk_shape)) * ds.dtype.itemsize
        gap = 0
        with ThreadPoolExecutor(self.parallel) as pool:
            while level:
                if self.cache is not None:
                    nodes = self.cache.read_many([(n[0], size) for n in level], gap)
                    with self._lock:
                        self.metadata_bytes += size * len(nodes)
                else:
                    nodes = list(pool.map(lambda n: self.read(n[0], size), level))
                nxt = []
                for (addr, lo, hi), node in zip(level, nodes):
                    if node[:4] != b"TREE" or node[4] != 1:
                        raise LayoutError(f"chunk B-tree node expected at {addr}")
                    depth, used = node[5], int.from_bytes(node[6:8], "little")
                    need = 8 + 2 * self.so + used * (key + self.so) + key
                    if need > len(node):
                        node = self.read(addr, need)
                    p = 8 + 2 * self.so
                    keys, children = [], []
                    for _ in range(used):
                        keys.append(struct.unpack_from(f"<{rank}Q", node, p + 8))
                        children.append(self._addr(node, p + key))
                        p += key + self.so
                    starts = _linear(np.array(keys, np.int64).reshape(-1, rank), ds.shape)
                    # which child each wanted chunk falls in: the last key <= coordinate
                    sub = _linear(wanted[lo:hi], ds.shape)
                    idx = np.searchsorted(starts, sub, side="right") - 1
                    if depth == 0:
                        hit = (idx >= 0) & (starts[np.maximum(idx, 0)] == sub)
                        found = np.array(children, np.int64)[np.maximum(idx, 0)]
                        result[order[lo:hi][hit]] = found[hit]
                    else:
                        for child in np.unique(idx[idx >= 0]).tolist():
                            rows = np.flatnonzero(idx == child)
                            nxt.append((children[child], lo + int(rows[0]), lo + int(rows[-1]) + 1))
                # merge the next level's reads when it is the leaves and they lie near the chunks
                # they index: at most INDEX_BUDGET x what the leaves and the wanted chunks weigh
                leaves_next = bool(nodes) and nodes[0][5] == 1
                budget = min(INDEX_BUDGET * (len(nxt) * size + len(wanted) * chunk_bytes), INDEX_MAX_BYTES)
                if self.size is not None:
                    budget = min(budget, self.size // INDEX_SHARE)
                gap = merge_gap([n[0] for n in nxt], size, budget) if leaves_next and self.cache is not None else 0
                level = nxt
        return result


def _linear(rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Element offsets -> their C-order linear index (the B-tree's key order)."""
    strides = np.cumprod((1,) + tuple(shape[::-1]))[:-1][::-1].astype(np.int64)
    return rows.astype(np.int64) @ strides


def coalesce(offsets: np.ndarray, size: int, max_gap: int = 0) -> list[tuple[int, int, np.ndarray]]:
    """Merge equal-size ranges at ``offsets`` into (start, length, indices-in-order) runs.

    Ranges closer than ``max_gap`` bytes are merged too (reading the gap is cheaper than
    another request).
    """
    order = np.argsort(offsets, kind="stable")
    o = offsets[order]
    breaks = np.flatnonzero(o[1:] > o[:-1] + size + max_gap) + 1
    runs = []
    for a, b in zip(np.r_[0, breaks].tolist(), np.r_[breaks, o.size].tolist()):
        runs.append((int(o[a]), int(o[b - 1] + size - o[a]), order[a:b]))
    return runs
