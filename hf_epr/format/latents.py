"""The integer latents of a read container, decoded: the entropy-coded streams and the bit-packed groups are
shared out among workers (threads with the compiled decoder, forked processes without) that write the final values
into one buffer."""

from __future__ import annotations

import mmap
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any

import numpy as np

from .coders import coder, native, table_counts, unpack_bits
from .errors import EPRError, EPRFormatError


class MappedFile(mmap.mmap):
    """A memory map whose pages are given back as they are done with: a coded file, read only (made by
    ``read_container``: its pages stay in the page cache, and touching them again maps them back), so the peak
    memory of a load is the model, not the model plus the file; or :func:`decode_latents`' buffer (anonymous: only
    parts no longer read are given back)."""

    def release(self, start: int = 0, end: int | None = None) -> None:
        """Drop the whole pages within bytes [start, end) from this process's memory (where madvise exists)."""
        page, end = mmap.PAGESIZE, len(self) if end is None else end
        first, last = -(-start // page) * page, end // page * page
        if last > first and hasattr(mmap, "MADV_DONTNEED") and not self.closed:
            self.madvise(mmap.MADV_DONTNEED, first, last - first)


def _releaser(array: np.ndarray):
    """release(start, end): drop bytes [start, end) of ``array`` where it views a :class:`MappedFile`; else a no-op."""
    owner = array.base
    while isinstance(owner, np.ndarray):
        owner = owner.base
    owner = owner.obj if isinstance(owner, memoryview) else owner
    if not isinstance(owner, MappedFile) or array.size == 0:
        return lambda start, end: None
    offset = array.ctypes.data - np.frombuffer(owner, np.uint8).ctypes.data
    return lambda start, end: owner.release(offset + start, offset + end)


def release_decoded(values: np.ndarray) -> None:
    """Give back the whole pages of ``values`` (decoded groups no longer needed) where they view a
    :class:`MappedFile`."""
    _releaser(values)(0, values.nbytes)


def stream_plan(meta: dict[str, Any], n_words: int) -> list[tuple[int, int, int, int]]:
    """(first word, end word, first group, end group) of each independently decodable stream; files with
    one stream (all version 1 files) have no ``streams`` entry."""
    streams = meta.get("streams", [[n_words, len(meta["groups"])]])
    plan, word, group = [], 0, 0
    for n, g in streams:
        plan.append((word, word + n, group, group + g))
        word, group = word + n, group + g
    return plan


def _stream_spec(meta: dict[str, Any], groups: list[int], starts: np.ndarray,
                 bounds: np.ndarray | None) -> np.ndarray:
    """The compiled decoder's rows for the entropy-coded ``groups`` of one stream (see :class:`.coders.Coder`)."""
    return np.array([[off, n_sym, count, starts[i], lo] + ([bounds[i], bounds[i + 1]] if bounds is not None
                                                           else [-1, -1])
                     for i, (lo, n_sym, off, count, _) in ((i, meta["groups"][i]) for i in groups)],
                    np.int64).reshape(-1, 7)


def _decode_stream(meta: dict[str, Any], words: np.ndarray, counts: np.ndarray, groups: list[int],
                   starts: np.ndarray, out: np.ndarray, escapes: np.ndarray, bounds: np.ndarray | None) -> None:
    """Decode the entropy-coded ``groups`` of one stream into ``out`` at each group's start (with constriction):
    their values when ``bounds`` gives each group's escaped values in ``escapes`` (version 3), else their table
    indices."""
    rows = [meta["groups"][i] for i in groups]
    tables = [(counts[off: off + n_sym], count) for _, n_sym, off, count, _ in rows]
    for i, symbols in zip(groups, coder(meta.get("coder")).decode(words, tables, meta["precision"])):
        target = out[starts[i]: starts[i] + symbols.size]
        if bounds is not None:
            _to_values(target, meta["groups"][i], escapes[bounds[i]: bounds[i + 1]], symbols)
        else:
            target[:] = symbols


def _to_values(target: np.ndarray, group: list[int], escaped: np.ndarray, symbols: np.ndarray | None = None) -> None:
    """Table indices (``symbols``, else ``target`` itself) -> values in ``target``: the table's start added, the
    escaped values where the escape symbol is."""
    lo, n_sym = group[0], group[1]
    symbols = target if symbols is None else symbols
    esc = np.flatnonzero(symbols == n_sym - 1)
    if esc.size != escaped.size:
        raise EPRFormatError("a coded group holds a different number of escapes than the file")
    np.add(symbols, np.int32(lo), out=target)
    target[esc] = escaped


def decode_processes() -> int:
    """Workers that decode a multi-stream file: ``$HF_EPR_DECODE_PROCESSES``, else the CPUs this process may
    use. The compiled decoder releases the GIL, so they are threads; constriction holds it, so without the compiled
    decoder they are forked processes writing into shared memory (nothing is pickled; one where ``os.fork`` does
    not exist: see :func:`decode_latents`)."""
    value = os.environ.get("HF_EPR_DECODE_PROCESSES")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise EPRError(f"HF_EPR_DECODE_PROCESSES must be a positive integer, not {value!r}")
        return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def decode_latents(meta: dict[str, Any], arrays: dict[str, np.ndarray],
                   processes: int | None = None) -> list[np.ndarray]:
    """Decode every group's integer latents (int32), in group order. The streams and the packed groups of a file
    are decoded by up to ``processes`` workers at once (default: :func:`decode_processes`), each writing final
    values (escapes included, for version 3 files) into one buffer."""
    precision, groups = meta["precision"], meta["groups"]
    decode_into = coder(meta.get("coder")).decode_into  # an unknown coder is a format error, before any work
    threads = native() is not None and decode_into is not None
    counts = table_counts(arrays["tables"])
    for lo, n_sym, off, count, mode in groups:
        table, total = counts[off: off + n_sym], int(counts[off: off + n_sym].sum())
        if mode == 0 and count and (total & (total - 1) or total > (1 << precision) or table.min() == 0):
            raise EPRFormatError("a stored table does not sum to a power of two up to 2**precision, or has a zero count")
    sizes = np.array([g[3] for g in groups], np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    total = int(starts[-1])
    coded = [i for i, g in enumerate(groups) if g[4] == 0]
    bounds = None  # version 3: every group knows its escapes (these offsets), so the workers finish the values
    if "group_escapes" in meta:
        bounds = np.concatenate([[0], np.cumsum(meta["group_escapes"], dtype=np.int64)])
    # (work, what, job): a stream's work is its symbols; unpacking costs about an eighth as much per value
    jobs = [(sum(groups[coded[g]][3] for g in range(g0, g1)), "stream", (w0, w1, [coded[g] for g in range(g0, g1)]))
            for w0, w1, g0, g1 in stream_plan({**meta, "groups": coded}, arrays["coded"].size)]
    jobs += [(groups[i][3] // 8, "packed", i) for i, g in enumerate(groups) if g[4] == 1]
    processes = max(1, min(len(jobs), decode_processes() if processes is None else processes))
    if not (threads or hasattr(os, "fork")):
        processes = 1
    shares: list[list] = [[] for _ in range(processes)]  # largest job first to the least loaded process
    loads = [0] * processes
    for job in sorted(jobs, key=lambda job: -job[0]):
        k = loads.index(min(loads))
        shares[k].append(job)
        loads[k] += job[0]
    # an anonymous mapping (freed with the last array that views it): shared with forked processes, or for threads
    # faulted in by them, a part each, before they decode (faster than faults on first write, racing between threads)
    shared = None
    if threads and hasattr(mmap, "MAP_ANONYMOUS"):
        shared = MappedFile(-1, max(4 * total, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    elif not threads and processes > 1:
        shared = MappedFile(-1, max(4 * total, 1))
    out = np.frombuffer(shared, np.int32, total) if shared is not None else np.empty(total, np.int32)
    part = -(-4 * total // processes)
    escapes = np.ascontiguousarray(arrays["escapes"], np.int32)

    release_coded, release_packed = _releaser(arrays["coded"]), _releaser(arrays["packed"])

    def run(k: int) -> None:
        share = shares[k]
        streams = [job for _, what, job in share if what == "stream"]
        if threads and shared is not None and hasattr(native(), "populate"):  # (not in older compiled modules)
            native().populate(shared, k * part, (k + 1) * part)
        if threads:  # all of this worker's streams in one call (decoded four at a time)
            try:
                decode_into([(np.ascontiguousarray(arrays["coded"][w0:w1], np.uint32),
                              _stream_spec(meta, ids, starts, bounds)) for w0, w1, ids in streams],
                            counts, escapes, out)
            except ValueError as err:
                raise EPRFormatError(f"the coded stream is corrupt: {err}") from None
        else:
            for w0, w1, ids in streams:
                _decode_stream(meta, arrays["coded"][w0:w1], counts, ids, starts, out, escapes, bounds)
        for w0, w1, _ in streams:
            release_coded(4 * w0, 4 * w1)
        for _, what, job in share:
            if what == "packed":
                lo, width, bit, count, _ = groups[job]
                unpack_bits(arrays["packed"], bit, width, count, out[starts[job]: starts[job] + count], lo)
                release_packed(bit // 8, (bit + width * count) // 8)

    children = []
    try:
        if threads:  # the compiled loops release the GIL
            with ThreadPoolExecutor(processes - 1) if processes > 1 else nullcontext() as pool:
                others = [pool.submit(run, k) for k in range(1, processes)]
                run(0)
                for other in others:
                    other.result()
        else:
            for k in range(1, processes):
                pid = os.fork()
                if pid == 0:  # child: decode its share into the shared buffer, then leave at once
                    code = 1
                    try:
                        run(k)
                        code = 0
                    finally:
                        os._exit(code)
                children.append(pid)
            run(0)
    except EPRFormatError:
        raise
    except Exception as err:
        raise EPRFormatError(f"the coded stream is corrupt: {err}") from None
    finally:
        failed = [pid for pid in children if os.waitpid(pid, 0)[1] != 0]
    if failed:
        raise EPRFormatError("the coded stream is corrupt: a decoding process failed")
    values = [out[starts[i]: starts[i + 1]] for i in range(len(groups))]
    if bounds is None:  # versions 1 and 2: the escapes of each group follow from the decoded symbols
        used = 0
        for i in coded:
            k = int((values[i] == groups[i][1] - 1).sum())
            if used + k > arrays["escapes"].size:
                raise EPRFormatError("the coded stream needs more escaped values than the file holds")
            _to_values(values[i], groups[i], arrays["escapes"][used: used + k])
            used += k
        if used != arrays["escapes"].size:
            raise EPRFormatError("the file holds escaped values that the coded stream does not use")
    return values
