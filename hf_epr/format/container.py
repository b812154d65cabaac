"""The coded weights file (``epr_weights.safetensors``): layout, writing, reading and validation, side by side.

Layout (format version 2), one safetensors file, all little-endian:

* ``meta``    uint8: the JSON description (groups, tensors, precision, coder), zlib-compressed;
* ``coded``   uint32 words of the entropy-coded streams holding every integer latent, group by group (one
  stream, or several listed in the description's ``streams`` as [n_words, n_groups], decodable in parallel);
* ``tables``  uint8 LEB128 varints: the symbol counts of every group's table, concatenated (see ``coders``);
* ``escapes`` int32 values of latents outside their table's range, in coding order (absent when none);
* ``params``  float32 decoder parameters (see ``decoders``);
* ``raw.<dtype>`` raw tensors and buffers of one dtype, concatenated.

The safetensors metadata holds ``format`` ("hf_epr") and ``epr_sha256``, the sha256 of the whole file with
that digest replaced by 64 zeros. Version 1 files (the JSON as the metadata entry ``epr``, always an
``escapes`` tensor, range coded) are still read. Reading checks the checksum and validates every field before
anything is decoded or allocated; it never unpickles or evaluates anything.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import mmap
import os
import re
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .coders import ANS, coder, ideal_bits, symbols_of
from .decoders import decoder_for_entry
from .errors import EPRError, EPRFormatError

FORMAT_NAME = "hf_epr"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
WEIGHTS_NAME = "epr_weights.safetensors"
META_TENSOR = "meta"
MAX_META_BYTES = 1 << 26  # 64 MiB of JSON
MAX_FILE_BYTES = 1 << 36  # 64 GiB
MAX_TENSOR_NUMEL = 1 << 32
MAX_TOTAL_NUMEL = 1 << 34
STREAM_SYMBOLS = 1 << 22  # about 0.1 s of decoding: files with more symbols get one stream per this many
MAX_STREAMS = 16
_DIGEST_RE = re.compile(rb'"epr_sha256":"([0-9a-f]{64})"')
_SAFETENSORS_DTYPES = {np.dtype(k): v for k, v in [
    ("uint32", "U32"), ("uint16", "U16"), ("int32", "I32"), ("int64", "I64"), ("float32", "F32"),
    ("float16", "F16"), ("bool", "BOOL"), ("uint8", "U8")]}


# ---------------------------------------------------------------------------------------------
# In memory
# ---------------------------------------------------------------------------------------------


@dataclass
class CodedGroup:
    """One group of integer latents with its table over [lo, lo + n_symbols - 2] + escape."""

    lo: int
    counts: np.ndarray  # uint16, sum 2**precision, last entry = escape symbol
    values: np.ndarray  # int32 latents in coding order

    def ideal_bits(self, precision: int) -> float:
        return ideal_bits(self.lo, self.counts, self.values, precision)


@dataclass
class Container:
    """Everything one coded weights file holds, before serialization (or after decoding)."""

    precision: int
    groups: list[CodedGroup] = field(default_factory=list)
    tensors: list[dict[str, Any]] = field(default_factory=list)
    params: list[float] = field(default_factory=list)
    raw: dict[str, list[np.ndarray]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def add_raw(self, array: np.ndarray, dtype: str) -> int:
        """Append a raw tensor; returns its offset in ``raw.<dtype>``."""
        chunks = self.raw.setdefault(dtype, [])
        offset = sum(c.size for c in chunks)
        chunks.append(np.ascontiguousarray(array).reshape(-1))
        return offset

    def to_bytes(self) -> bytes:
        """Serialize: safetensors with the zlib-compressed JSON description as a tensor, and a checksum."""
        words, escapes, streams = encode_groups(self.groups, self.precision, split_streams(self.groups))
        offsets = np.cumsum([0] + [g.counts.size for g in self.groups])[:-1].tolist()
        meta = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "precision": self.precision,
            "coder": ANS,
            "constriction": importlib.metadata.version("constriction"),
            "n_escapes": int(escapes.size),
            "groups": [[int(g.lo), int(g.counts.size), int(o), int(g.values.size)] for g, o in zip(self.groups, offsets)],
            "tensors": self.tensors, **self.extra,
        }
        if len(streams) > 1:
            meta["streams"] = streams
        description = zlib.compress(json.dumps(meta, separators=(",", ":")).encode(), 9)
        counts = np.concatenate([g.counts for g in self.groups]) if self.groups else np.zeros(0, np.int64)
        arrays = {
            META_TENSOR: np.frombuffer(description, np.uint8),
            "coded": words,
            "tables": varints(counts),
            "params": np.asarray(self.params, np.float32),
        }
        if escapes.size:
            arrays["escapes"] = escapes
        for dtype, chunks in self.raw.items():
            arrays[f"raw.{dtype}"] = np.concatenate(chunks)
        data = safetensors_bytes(arrays, {"format": FORMAT_NAME, "epr_sha256": "0" * 64})
        digest = digest_of(data).encode()
        return data.replace(b'"epr_sha256":"' + b"0" * 64 + b'"', b'"epr_sha256":"' + digest + b'"', 1)

    @classmethod
    def from_arrays(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> "Container":
        """The Container a read file was written from (decodes the latents)."""
        counts = table_counts(arrays["tables"])
        latents = decode_latents(meta, arrays)
        c = cls(precision=meta["precision"], tensors=meta["tensors"], params=arrays["params"].tolist())
        c.groups = [CodedGroup(lo, counts[off: off + n].astype(np.uint16), v)
                    for (lo, n, off, _), v in zip(meta["groups"], latents)]
        c.raw = {k.removeprefix("raw."): [v] for k, v in arrays.items() if k.startswith("raw.")}
        known = ("format", "version", "precision", "coder", "constriction", "streams", "n_escapes", "groups", "tensors")
        c.extra = {k: v for k, v in meta.items() if k not in known}
        return c

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Container":
        return cls.from_arrays(*read_container(path))

    def size_report(self) -> dict[str, Any]:
        """Per tensor: name, shape, kind, bits (ideal under its tables), bytes (coded bits + table + decoder
        parameters + escapes, or raw bytes); totals from the real serialized size, and ``ideal_bytes``: the
        latents' ideal code length under the stored tables plus the raw tensors (the file without tables,
        description or coder overhead)."""
        total = len(self.to_bytes())
        rows, accounted, ideal = [], 0.0, 0.0
        for t in self.tensors:
            numel = math.prod(t["shape"])
            if t["kind"] == "raw":
                nbytes = numel * np.dtype(t["dtype"]).itemsize
                bits = 8.0 * nbytes
            else:
                groups = [self.groups[g] for g in t["groups"]]
                bits = sum(g.ideal_bits(self.precision) for g in groups)
                n_params = decoder_for_entry(t).num_params
                n_escapes = sum(symbols_of(g.lo, g.counts, g.values)[1].size for g in groups)
                table_bytes = varints(np.concatenate([g.counts for g in groups])).size
                nbytes = bits / 8 + table_bytes + 4 * (n_params + n_escapes)
            accounted += nbytes
            ideal += bits / 8
            rows.append({"name": t["name"], "shape": t["shape"], "kind": t["kind"], "bits": bits, "bytes": nbytes,
                         "bits_per_param": bits / max(1, numel)})
        fp32 = sum(4 * math.prod(t["shape"]) for t in self.tensors)
        return {"tensors": rows, "total_bytes": total, "container_overhead_bytes": total - accounted,
                "ideal_bytes": ideal, "file_over_ideal": total / max(ideal, 1.0), "fp32_bytes": fp32,
                "ratio": fp32 / total}


def file_size_report(path: str | os.PathLike) -> dict[str, Any]:
    """:meth:`Container.size_report` of a saved coded weights file, or of the one in a repo folder."""
    if os.path.isdir(path):
        path = os.path.join(path, WEIGHTS_NAME)
    return Container.from_file(path).size_report()


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def varints(values: np.ndarray) -> np.ndarray:
    """LEB128 encoding (7 bits per byte, high bit = more follows) of non-negative integers < 2**21."""
    v = np.asarray(values, np.int64)
    nbytes = 1 + (v >= 1 << 7) + (v >= 1 << 14)
    out = np.zeros(int(nbytes.sum()), np.uint8)
    pos = np.cumsum(nbytes) - nbytes
    for k in range(3):
        sel = nbytes > k
        more = (nbytes > k + 1)[sel]
        out[pos[sel] + k] = ((v[sel] >> (7 * k)) & 0x7F) | (more * 0x80)
    return out


def split_streams(groups: list[CodedGroup], target: int | None = None) -> list[int]:
    """Number of consecutive groups in each stream: about ``total / target`` streams (at most MAX_STREAMS) of
    balanced symbol counts, cut at group boundaries, so that several processes can decode a large file."""
    target = target or STREAM_SYMBOLS
    sizes = np.array([g.values.size for g in groups], np.int64)
    n = int(min(MAX_STREAMS, len(groups), max(1, -(-int(sizes.sum()) // target))))
    if n <= 1:
        return [len(groups)]
    ends = np.searchsorted(np.cumsum(sizes), sizes.sum() * np.arange(1, n) / n) + 1  # first group after each cut
    cuts = sorted(set(int(e) for e in ends if 0 < e < len(groups)))
    return np.diff([0, *cuts, len(groups)]).tolist()


def encode_groups(groups: list[CodedGroup], precision: int, streams: list[int] | None = None,
                  coder_name: str = ANS) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """The coded words of consecutive runs of ``streams[k]`` groups (concatenated), the escaped values (in
    decoding order), and ``[n_words, n_groups]`` per stream."""
    streams = [len(groups)] if streams is None else streams
    encode = coder(coder_name).encode
    coded = [symbols_of(g.lo, g.counts, g.values) for g in groups]  # (table indices, escaped values) per group
    words, table, first = [], [], 0
    for n in streams:
        words.append(encode([(sym, g.counts) for g, (sym, _) in zip(groups[first: first + n], coded[first: first + n])],
                            precision))
        table.append([int(words[-1].size), n])
        first += n
    escapes = [esc for _, esc in coded]
    return (np.concatenate(words) if words else np.zeros(0, np.uint32),
            (np.concatenate(escapes) if escapes else np.zeros(0, np.int32)).astype(np.int32), table)


def safetensors_bytes(arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """A safetensors file with a deterministic layout (sorted names, metadata first), so saves are byte-stable."""
    header: dict[str, Any] = {"__metadata__": metadata}
    chunks, pos = [], 0
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [pos, pos + len(raw)]}
        chunks.append(raw)
        pos += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(chunks)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to ``path`` through a temporary file in the same folder and an atomic rename; the file gets
    the permissions ``open()`` would give it (0666 minus the umask)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------
# Reading and validation
# ---------------------------------------------------------------------------------------------


def digest_of(data: bytes) -> str:
    """sha256 of a container's bytes with its stored digest zeroed (the value stored in it)."""
    match = _DIGEST_RE.search(data, 8, 8 + _header_length(data))
    if match is None:
        raise EPRFormatError("the file has no 'epr_sha256' checksum: it was not written by hf_epr")
    zeroed = data[: match.start(1)] + b"0" * 64 + data[match.end(1):]
    return hashlib.sha256(zeroed).hexdigest()


def _header_length(data: bytes) -> int:
    if len(data) < 8:
        raise EPRFormatError(f"the file is truncated: {len(data)} bytes, not even a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n <= 1 or 8 + n > len(data):
        raise EPRFormatError(
            f"the file is truncated or corrupt: its header claims {n} bytes but the file has {len(data)}")
    return n


def parse_container(data: bytes) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Check a container's bytes and return (description, arrays). Raises :class:`EPRFormatError`."""
    if len(data) > MAX_FILE_BYTES:
        raise EPRFormatError(f"the file is {len(data)} bytes, more than the {MAX_FILE_BYTES} this reader accepts")
    n = _header_length(data)
    try:
        header = json.loads(data[8: 8 + n])
        stored = header["__metadata__"]["epr_sha256"]
    except (ValueError, KeyError, TypeError) as err:
        raise EPRFormatError(f"the file's header is not an hf_epr header ({err!r}); was it written by hf_epr?") from None
    if digest_of(data) != stored:
        raise EPRFormatError("checksum mismatch: the file is corrupt (a byte changed or it was truncated); "
                             "download or save it again")
    try:
        from safetensors.numpy import load
        arrays = load(data)
    except Exception as err:  # safetensors raises its own error types
        raise EPRFormatError(f"the safetensors payload is invalid: {err}") from None
    meta = _description(header["__metadata__"], arrays)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise EPRFormatError("the metadata does not describe an hf_epr file")
    if meta.get("version") not in READABLE_VERSIONS:
        raise EPRFormatError(f"format version {meta.get('version')!r} is not supported by this reader "
                             f"(it reads versions {READABLE_VERSIONS}); upgrade hf_epr")
    arrays.setdefault("escapes", np.zeros(0, np.int32))
    validate(meta, arrays)
    return meta, arrays


def _description(metadata: dict[str, str], arrays: dict[str, np.ndarray]) -> Any:
    """The JSON description: zlib-compressed in the ``meta`` tensor (v2), or the metadata entry ``epr`` (v1)."""
    try:
        if "epr" in metadata:
            return json.loads(metadata["epr"])
        blob = arrays.pop(META_TENSOR)
        inflater = zlib.decompressobj()
        text = inflater.decompress(blob.tobytes(), MAX_META_BYTES)
        if inflater.unconsumed_tail or not inflater.eof:
            raise EPRFormatError(f"the metadata is truncated or larger than {MAX_META_BYTES} bytes")
        return json.loads(text)
    except EPRFormatError:
        raise
    except (ValueError, KeyError, TypeError, zlib.error) as err:
        raise EPRFormatError(f"the file's description is missing or corrupt ({err!r}); "
                             "was it written by hf_epr?") from None


def read_container(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read and check a coded weights file."""
    if not os.path.isfile(path):
        raise EPRFormatError(f"{path} does not exist: this is not an hf_epr compressed checkpoint")
    size = os.path.getsize(path)
    if size > MAX_FILE_BYTES:
        raise EPRFormatError(f"{path} is {size} bytes, more than the {MAX_FILE_BYTES} this reader accepts")
    with open(path, "rb") as f:
        return parse_container(f.read())


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise EPRFormatError(f"inconsistent metadata: {what}")


def _int(x: Any, lo: int = 0, hi: int = MAX_TOTAL_NUMEL) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi


def validate(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Check that the description and the arrays agree, before anything is decoded or allocated."""
    expect = {"coded": np.uint32, "tables": np.uint8, "escapes": np.int32, "params": np.float32}
    for name, dtype in expect.items():
        _need(name in arrays, f"tensor '{name}' is missing")
        _need(arrays[name].dtype == dtype and arrays[name].ndim == 1, f"tensor '{name}' has the wrong dtype/shape")
    precision = meta.get("precision")
    _need(_int(precision, 8, 16), "precision must be an integer in [8, 16]")
    groups = meta.get("groups")
    _need(isinstance(groups, list), "'groups' must be a list")
    n_tables = len(table_counts(arrays["tables"]))
    total_latents = 0
    for g in groups:
        _need(isinstance(g, list) and len(g) == 4 and all(_int(v, -(1 << 31), 1 << 34) for v in g),
              f"group entry {g!r} must be [lo, n_symbols, table_offset, n_latents]")
        lo, n_sym, off, count = g
        _need(2 <= n_sym <= (1 << precision) and 0 <= off and off + n_sym <= n_tables,
              f"group table [{off}, {off}+{n_sym}) is outside the {n_tables} stored counts")
        _need(0 <= count <= MAX_TENSOR_NUMEL, f"group latent count {count} is absurd")
        total_latents += count
    tensors = meta.get("tensors")
    _need(isinstance(tensors, list), "'tensors' must be a list")
    coded_numel = total = 0
    seen: set[str] = set()
    for t in tensors:
        _need(isinstance(t, dict) and isinstance(t.get("name"), str), "every tensor needs a name")
        names = [t["name"], *t.get("aliases", [])]
        _need(all(isinstance(n, str) for n in names) and not seen.intersection(names), f"duplicate name in {names}")
        seen.update(names)
        shape = t.get("shape")
        _need(isinstance(shape, list) and all(_int(s, 0, MAX_TENSOR_NUMEL) for s in shape), f"{t['name']}: bad shape")
        numel = math.prod(shape)
        _need(numel <= MAX_TENSOR_NUMEL, f"{t['name']}: {numel} elements is absurd")
        total += numel
        _need(total <= MAX_TOTAL_NUMEL, f"{total} elements in all is absurd")
        if t.get("kind") == "raw":
            key = f"raw.{t.get('dtype')}"
            _need(key in arrays, f"{t['name']}: tensor '{key}' is missing")
            off = t.get("offset")
            _need(_int(off) and off + numel <= arrays[key].size, f"{t['name']}: raw slice outside '{key}'")
            continue
        kind = decoder_for_entry(t)
        gids = t.get("groups")
        _need(isinstance(gids, list) and len(gids) == kind.num_groups
              and all(_int(i, 0, len(groups) - 1) for i in gids), f"{t['name']}: bad group ids")
        p = t.get("params")
        _need(_int(p) and p + kind.num_params <= arrays["params"].size, f"{t['name']}: parameters outside 'params'")
        for gid, needed in zip(gids, kind.group_sizes()):
            _need(groups[gid][3] == needed, f"{t['name']}: group {gid} holds {groups[gid][3]} latents, "
                                            f"the tensor needs {needed}")
        coded_numel += numel
    _need(coded_numel == total_latents, f"tensors need {coded_numel} latents, groups hold {total_latents}")
    if "streams" in meta:
        streams = meta["streams"]
        _need(isinstance(streams, list) and streams and all(
            isinstance(x, list) and len(x) == 2 and _int(x[0]) and _int(x[1], 1) for x in streams),
            "'streams' must be a non-empty list of [n_words, n_groups]")
        _need(sum(x[0] for x in streams) == arrays["coded"].size and sum(x[1] for x in streams) == len(groups),
              "the streams do not cover the coded words and the groups exactly")
    total_escapes = meta.get("n_escapes")
    _need(_int(total_escapes) and total_escapes == arrays["escapes"].size, "escape count disagrees with payload")


def table_counts(varints: np.ndarray) -> np.ndarray:
    """Decode the concatenated LEB128 varints of the tables (each value at most 3 bytes) to int64 counts."""
    b = np.asarray(varints, np.uint8)
    if b.size == 0:
        return np.zeros(0, np.int64)
    ends = np.flatnonzero((b & 0x80) == 0)
    if ends.size == 0 or ends[-1] != b.size - 1:
        raise EPRFormatError("the tables' varint stream is truncated")
    starts = np.concatenate([[0], ends[:-1] + 1])
    lengths = ends - starts + 1
    if lengths.max() > 3:
        raise EPRFormatError("a table count is longer than 3 bytes")
    shift = 7 * (np.arange(b.size) - np.repeat(starts, lengths))
    return np.add.reduceat((b & 0x7F).astype(np.int64) << shift, starts)


def stream_plan(meta: dict[str, Any], n_words: int) -> list[tuple[int, int, int, int]]:
    """(first word, end word, first group, end group) of each independently decodable stream; files with
    one stream (all version 1 files) have no ``streams`` entry."""
    streams = meta.get("streams", [[n_words, len(meta["groups"])]])
    plan, word, group = [], 0, 0
    for n, g in streams:
        plan.append((word, word + n, group, group + g))
        word, group = word + n, group + g
    return plan


def _decode_symbols(meta: dict[str, Any], words: np.ndarray, counts: np.ndarray, groups: range,
                    starts: np.ndarray, out: np.ndarray) -> None:
    """Decode the table indices of ``groups`` (one stream) into ``out`` at each group's start."""
    tables = [(counts[off: off + n_sym], count) for _, n_sym, off, count in (meta["groups"][i] for i in groups)]
    decoded = coder(meta.get("coder")).decode(words, tables, meta["precision"])
    for i, symbols in zip(groups, decoded):
        out[starts[i]: starts[i] + symbols.size] = symbols


def decode_processes() -> int:
    """Processes that decode a multi-stream file: ``$HF_EPR_DECODE_PROCESSES``, else the CPUs this process may
    use (1 where ``os.fork`` does not exist). constriction holds the GIL while it decodes, so threads would not
    help; forked children write into shared memory (nothing is pickled)."""
    if not hasattr(os, "fork"):
        return 1
    value = os.environ.get("HF_EPR_DECODE_PROCESSES")
    if value:
        if not value.isdigit() or int(value) < 1:
            raise EPRError(f"HF_EPR_DECODE_PROCESSES must be a positive integer, not {value!r}")
        return int(value)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def decode_latents(meta: dict[str, Any], arrays: dict[str, np.ndarray],
                   processes: int | None = None) -> list[np.ndarray]:
    """Decode every group's integer latents (int32), in group order; the streams of a multi-stream file
    are decoded by up to ``processes`` processes at once (default: :func:`decode_processes`)."""
    precision, groups = meta["precision"], meta["groups"]
    coder(meta.get("coder"))  # an unknown coder is a format error, before any work
    counts = table_counts(arrays["tables"])
    for lo, n_sym, off, count in groups:
        table = counts[off: off + n_sym]
        if count and (int(table.sum()) != (1 << precision) or table.min() == 0):
            raise EPRFormatError("a stored table does not sum to 2**precision or has a zero count")
    sizes = np.array([g[3] for g in groups], np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    total = int(starts[-1])
    plan = stream_plan(meta, arrays["coded"].size)
    processes = min(len(plan), decode_processes() if processes is None else processes)
    # with several processes: an anonymous shared mapping (freed with the last array that views it)
    shared = mmap.mmap(-1, max(4 * total, 1)) if processes > 1 else None
    symbols = np.frombuffer(shared, np.int32, total) if shared is not None else np.empty(total, np.int32)

    def run(jobs: list[tuple[int, int, int, int]]) -> None:
        for w0, w1, g0, g1 in jobs:
            _decode_symbols(meta, arrays["coded"][w0:w1], counts, range(g0, g1), starts, symbols)

    children = []
    try:
        for k in range(1, processes):
            pid = os.fork()
            if pid == 0:  # child: decode its share of the streams into the shared buffer, then leave at once
                code = 1
                try:
                    run(plan[k::processes])
                    code = 0
                finally:
                    os._exit(code)
            children.append(pid)
        run(plan[0::processes])
    except EPRFormatError:
        raise
    except Exception as err:
        raise EPRFormatError(f"the coded stream is corrupt: {err}") from None
    finally:
        failed = [pid for pid in children if os.waitpid(pid, 0)[1] != 0]
    if failed:
        raise EPRFormatError("the coded stream is corrupt: a decoding process failed")

    escapes, used, out = arrays["escapes"], 0, []
    for (lo, n_sym, _, count), start in zip(groups, starts):
        values = symbols[start: start + count]
        esc = values == n_sym - 1
        values += np.int32(lo)
        k = int(esc.sum())
        if k:
            if used + k > escapes.size:
                raise EPRFormatError("the coded stream needs more escaped values than the file holds")
            values[esc] = escapes[used: used + k]
            used += k
        out.append(values)
    if used != escapes.size:
        raise EPRFormatError("the file holds escaped values that the coded stream does not use")
    return out
