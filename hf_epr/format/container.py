"""The coded weights file (``epr_weights.safetensors``): layout, writing, reading and validation, side by side.

Format version 3: one safetensors file holding one uint8 tensor ``epr`` (little-endian throughout):

* a varint length and the raw-deflated binary description: precision, coder, decoder kinds, raw dtypes, the
  streams as [n_words, n_groups], every group as (mode, lo, n_symbols or bit width, n_latents), every tensor as
  (name, aliases, kind, shape, dtype or kind layout), the escape count, and the symbol counts of the tables as
  LEB128 varints (see ``coders``). Groups, decoder parameters and raw tensors belong to the tensors in order.
* then, each aligned to its item size: the float32 decoder parameters, the int32 escaped values, the uint32 words
  of the entropy-coded streams (mode 0 groups, group by group; several streams decode in parallel), the raw
  tensors by dtype, and the bit-packed groups (mode 1: fixed-width integers, for nearly uniform groups where
  packing is within ``PACK_TOLERANCE`` of entropy coding and decodes far faster), padded with 8 zero bytes.

The blob starts with the magic bytes ``EPR\x03`` and the CRC-32 of the whole file (computed with those 4 bytes
zero). Versions 1 and 2 (a zlib-compressed JSON description, one safetensors tensor per section, and a sha256 in
the safetensors metadata) are still read. Reading checks the checksum and validates every field before anything is decoded or
allocated; it never unpickles or evaluates anything.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import tempfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .coders import ANS, coder, ideal_bits, native, pack_bits, packed_width, symbols_of, table_counts, varints
from .decoders import decoder_for_entry
from .errors import EPRFormatError
from .latents import MappedFile, decode_latents, decode_processes

FORMAT_NAME = "hf_epr"
FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
BLOB = "epr"
MAGIC = b"EPR\x03"  # the blob of a version 3 file starts with this, then the CRC-32 of the file (zeroed)
CHECKSUM_BYTES = 4
CODER_NAMES = {"ans": ANS}  # short names of the coders in version 3 descriptions
PACK_TOLERANCE = 1.02  # a group is bit-packed when that takes at most 2% more bits than entropy coding it
WEIGHTS_NAME = "epr_weights.safetensors"
META_TENSOR = "meta"
MAX_META_BYTES = 1 << 26  # 64 MiB of JSON
MAX_FILE_BYTES = 1 << 36  # 64 GiB
MAX_TENSOR_NUMEL = 1 << 32
MAX_TOTAL_NUMEL = 1 << 34
STREAM_SYMBOLS = 1 << 20  # 4-30 ms of decoding (compiled / constriction): larger files get one stream per this many
MAX_STREAMS = 64  # enough to keep many cores busy and two cores evenly loaded (streams are cut between groups)
RAW_DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "bool": np.bool_,
              "uint8": np.uint8}
CRC_PART_BYTES = 1 << 23  # buffers of several times this are checksummed in parallel parts
_DIGEST_RE = re.compile(rb'"epr_sha256":"([0-9a-f]{64})"')
_SAFETENSORS_DTYPES = {np.dtype(k): v for k, v in [
    ("uint32", "U32"), ("uint16", "U16"), ("int32", "I32"), ("int64", "I64"), ("float32", "F32"),
    ("float16", "F16"), ("bool", "BOOL"), ("uint8", "U8")]}


# ---------------------------------------------------------------------------------------------
# In memory
# ---------------------------------------------------------------------------------------------


@dataclass
class CodedGroup:
    """One group of integer latents, entropy coded with its table over [lo, lo + n_symbols - 2] + escape, or
    bit-packed (``counts`` None, ``width`` bits above ``lo``)."""

    lo: int
    counts: np.ndarray | None  # uint16, sum 2**precision, last entry = escape symbol
    values: np.ndarray  # int32 latents in coding order
    width: int | None = None

    def packing(self, precision: int) -> tuple[int, int] | None:
        """(lo, width) when the group is stored bit-packed, else None (entropy coded)."""
        if self.counts is None:
            return self.lo, self.width
        if not self.values.size:
            return None
        lo, width = packed_width(self.values)
        entropy_coded = (ideal_bits(self.lo, self.counts, self.values, precision)
                         + 32 * symbols_of(self.lo, self.counts, self.values)[1].size + 8 * varints(self.counts).size)
        return (lo, width) if width <= 32 and width * self.values.size <= PACK_TOLERANCE * entropy_coded else None

    def entropy_bits(self, precision: int) -> float:
        """-sum log2 p of the values under the group's table (however the group is stored)."""
        return ideal_bits(self.lo, self.counts, self.values, precision)

    def ideal_bits(self, precision: int) -> float:
        """The group's bits as stored: -sum log2 p under its table (entropy coded), or the packed bits."""
        packing = self.packing(precision)
        if packing is not None:
            return float(packing[1] * self.values.size)
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
        """Serialize (format version 3): one safetensors tensor holding the deflated binary description and the
        sections, and a checksum."""
        groups, params, raw = self._in_tensor_order()
        packing = [g.packing(self.precision) for g in groups]
        ans = [g for g, p in zip(groups, packing) if p is None]
        words, escapes, streams = encode_groups(ans, self.precision, split_streams(ans))
        kinds = sorted({t["kind"] for t in self.tensors if t["kind"] != "raw"})
        dtypes = list(raw)
        d = _Writer()
        d.uints([FORMAT_VERSION, self.precision])
        d.text("ans")
        d.texts(kinds)
        d.texts(dtypes)
        d.uints([len(streams), *(n for stream in streams for n in stream), len(groups)])
        packed = []
        for g, p in zip(groups, packing):
            if p is None:
                d.uint(0)
                d.sint(g.lo)
                d.uints([g.counts.size, g.values.size, symbols_of(g.lo, g.counts, g.values)[1].size])
            else:
                d.uint(1)
                d.sint(p[0])
                d.uints([p[1], g.values.size])
                packed.append(pack_bits(g.values, *p))
        d.uint(len(self.tensors))
        for t in self.tensors:
            d.text(t["name"])
            d.texts(t.get("aliases", []))
            d.uints([0 if t["kind"] == "raw" else 1 + kinds.index(t["kind"]), len(t["shape"]), *t["shape"]])
            if t["kind"] == "raw":
                d.uint(dtypes.index(t["dtype"]))
            else:
                layout = decoder_for_entry(t).layout()
                d.text(json.dumps(layout, separators=(",", ":")) if layout else "")
        d.text(json.dumps(self.extra, separators=(",", ":")) if self.extra else "")
        tables = varints(np.concatenate([g.counts for g in ans])) if ans else np.zeros(0, np.uint8)
        d.uint(tables.size)
        deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
        description = deflater.compress(d.getvalue() + tables.tobytes()) + deflater.flush()
        blob = _Writer()
        blob.uint(len(description))
        blob.raw(description)
        for section in [np.asarray(params, np.float32), escapes, words, *(raw[k] for k in dtypes)]:
            blob.align(section.dtype.itemsize)
            blob.raw(np.ascontiguousarray(section).astype(section.dtype.newbyteorder("<"), copy=False).tobytes())
        if packed:
            blob.raw(b"".join(p.tobytes() for p in packed) + bytes(8))
        data = bytearray(safetensors_bytes({BLOB: np.frombuffer(MAGIC + bytes(CHECKSUM_BYTES) + blob.getvalue(),
                                                                 np.uint8)}))
        start = 8 + int.from_bytes(data[:8], "little") + len(MAGIC)
        data[start: start + CHECKSUM_BYTES] = crc32(data).to_bytes(CHECKSUM_BYTES, "little")  # field zeroed
        return bytes(data)

    def _in_tensor_order(self) -> tuple[list[CodedGroup], list[float], dict[str, np.ndarray]]:
        """Groups, decoder parameters and raw values in the order of the tensors that own them (how version 3
        files store them, with no offsets)."""
        groups, params, raw = [], [], {}
        for t in self.tensors:
            if t["kind"] == "raw":
                flat = np.concatenate(self.raw[t["dtype"]]) if len(self.raw[t["dtype"]]) > 1 else self.raw[t["dtype"]][0]
                raw.setdefault(t["dtype"], []).append(flat[t["offset"]: t["offset"] + math.prod(t["shape"])])
            else:
                groups += [self.groups[g] for g in t["groups"]]
                params += self.params[t["params"]: t["params"] + decoder_for_entry(t).num_params]
        return groups, params, {k: np.concatenate(v) for k, v in raw.items()}

    @classmethod
    def from_arrays(cls, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> "Container":
        """The Container a read file was written from (decodes the latents)."""
        counts = table_counts(arrays["tables"])
        latents = decode_latents(meta, arrays)
        c = cls(precision=meta["precision"], tensors=meta["tensors"], params=arrays["params"].tolist())
        c.groups = [CodedGroup(lo, counts[off: off + n].astype(np.uint16), v) if mode == 0 else
                    CodedGroup(lo, None, v, width=n)
                    for (lo, n, off, _, mode), v in zip(meta["groups"], latents)]
        c.raw = {k.removeprefix("raw."): [v.copy()] for k, v in arrays.items() if k.startswith("raw.")}  # not the file
        known = ("format", "version", "precision", "coder", "constriction", "streams", "n_escapes", "groups", "tensors",
                 "group_escapes")
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
                coded = [g for g in groups if g.packing(self.precision) is None]
                n_params = decoder_for_entry(t).num_params
                n_escapes = sum(symbols_of(g.lo, g.counts, g.values)[1].size for g in coded)
                table_bytes = sum(varints(g.counts).size for g in coded)
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


def safetensors_bytes(arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file with a deterministic layout (sorted names, metadata first), so saves are byte-stable."""
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
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


class _Writer:
    """Bytes of a version 3 description: LEB128 varints, zigzag for signed values, length-prefixed text."""

    def __init__(self):
        self.parts: list[bytes] = []
        self.size = 0

    def raw(self, data: bytes) -> None:
        self.parts.append(data)
        self.size += len(data)

    def uint(self, value: int) -> None:
        out = bytearray()
        while True:
            byte, value = value & 0x7F, value >> 7
            out.append(byte | (0x80 if value else 0))
            if not value:
                break
        self.raw(bytes(out))

    def uints(self, values) -> None:
        for v in values:
            self.uint(int(v))

    def sint(self, value: int) -> None:
        self.uint(2 * value if value >= 0 else -2 * value - 1)

    def text(self, value: str) -> None:
        data = value.encode()
        self.uint(len(data))
        self.raw(data)

    def texts(self, values) -> None:
        self.uint(len(values))
        for v in values:
            self.text(v)

    def align(self, n: int) -> None:
        self.raw(bytes(-self.size % n))

    def getvalue(self) -> bytes:
        return b"".join(self.parts)


# ---------------------------------------------------------------------------------------------
# Reading and validation
# ---------------------------------------------------------------------------------------------


class _Reader:
    """Reads a version 3 description; every malformed or out-of-range field is an EPRFormatError."""

    def __init__(self, data: bytes | memoryview):
        self.data, self.pos = data, 0

    def uint(self, limit: int = MAX_TOTAL_NUMEL) -> int:
        value = shift = 0
        while True:
            if self.pos >= len(self.data) or shift > 63:
                raise EPRFormatError("the description is truncated or holds an overlong number")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if value > limit:
            raise EPRFormatError(f"the description holds {value} where at most {limit} fits")
        return value

    def sint(self) -> int:
        v = self.uint(1 << 33)
        return v // 2 if v % 2 == 0 else -(v + 1) // 2

    def text(self) -> str:
        n = self.uint(1 << 20)
        if self.pos + n > len(self.data):
            raise EPRFormatError("the description is truncated inside a name")
        try:
            value = bytes(self.data[self.pos: self.pos + n]).decode()
        except UnicodeDecodeError:
            raise EPRFormatError("the description holds a name that is not UTF-8") from None
        self.pos += n
        return value

    def texts(self) -> list[str]:
        return [self.text() for _ in range(self.uint(1 << 20))]


def _parse_v3(blob: memoryview) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The description and the sections (views of ``blob``, no copy) of a version 3 file, in the form of the
    earlier versions' (groups as [lo, n_symbols or width, table or bit offset, n_latents, mode])."""
    head = _Reader(blob)
    n = head.uint(MAX_META_BYTES)
    if head.pos + n > len(blob):
        raise EPRFormatError("the description is truncated")
    inflater = zlib.decompressobj(-15)
    try:
        text = inflater.decompress(bytes(blob[head.pos: head.pos + n]), MAX_META_BYTES)
    except zlib.error as err:
        raise EPRFormatError(f"the description is corrupt ({err})") from None
    if inflater.unconsumed_tail or inflater.unused_data or not inflater.eof:
        raise EPRFormatError(f"the description is truncated, followed by stray bytes or larger than {MAX_META_BYTES} bytes")
    r, offset = _Reader(text), head.pos + n
    version, precision, coder_name = r.uint(), r.uint(16), r.text()
    if version != 3:
        raise EPRFormatError(f"a version 3 container says version {version}")
    kinds, dtypes = r.texts(), r.texts()
    streams = [[r.uint(), r.uint()] for _ in range(r.uint(1 << 20))]
    groups, group_escapes, table_offset, bit_offset = [], [], 0, 0
    for _ in range(r.uint(MAX_TENSOR_NUMEL)):
        mode, lo = r.uint(1), r.sint()
        n_sym, count = r.uint(1 << 17 if mode == 0 else 32), r.uint(MAX_TENSOR_NUMEL)
        group_escapes.append(r.uint(count) if mode == 0 else 0)
        groups.append([lo, n_sym, table_offset if mode == 0 else bit_offset, count, mode])
        if mode == 0:
            table_offset += n_sym
        else:
            bit_offset += -(-n_sym * count // 8) * 8  # packed groups start on a byte
    tensors, next_group, next_param, raw_sizes = [], 0, 0, {k: 0 for k in dtypes}
    for _ in range(r.uint(MAX_TENSOR_NUMEL)):
        t = {"name": r.text(), "aliases": r.texts()}
        kind = r.uint(len(kinds))
        t["shape"] = [r.uint(MAX_TENSOR_NUMEL) for _ in range(r.uint(8))]
        if kind == 0:
            dtype = dtypes[min(r.uint(), len(dtypes) - 1)] if dtypes else None
            if dtype is None:
                raise EPRFormatError("a raw tensor names a dtype the file does not list")
            t.update(kind="raw", dtype=dtype, offset=raw_sizes[dtype])
            raw_sizes[dtype] += math.prod(t["shape"])
        else:
            layout = r.text()
            try:
                t.update(json.loads(layout) if layout else {})
            except ValueError:
                raise EPRFormatError(f"{t['name']}: its layout is not JSON") from None
            t["kind"] = kinds[kind - 1]
            spec = decoder_for_entry(t)
            t.update(groups=list(range(next_group, next_group + spec.num_groups)), params=next_param)
            next_group, next_param = next_group + spec.num_groups, next_param + spec.num_params
        tensors.append(t)
    n_escapes, extra = sum(group_escapes), r.text()
    n_tables = r.uint()
    if r.pos + n_tables != len(text):
        raise EPRFormatError("the description's tables do not end where the description does")
    meta = {"format": FORMAT_NAME, "version": 3, "precision": precision, "coder": CODER_NAMES.get(coder_name, coder_name),
            "n_escapes": n_escapes, "groups": groups, "tensors": tensors, "group_escapes": group_escapes}
    if len(streams) > 1:
        meta["streams"] = streams
    try:
        meta.update(json.loads(extra) if extra else {})
    except ValueError:
        raise EPRFormatError("the description's extra entries are not JSON") from None
    arrays = {"tables": np.frombuffer(text, np.uint8, n_tables, r.pos)}
    sizes = [("params", np.float32, next_param), ("escapes", np.int32, n_escapes),
              ("coded", np.uint32, sum(w for w, _ in streams))]
    for k in dtypes:
        if k not in RAW_DTYPES:
            raise EPRFormatError(f"raw dtype {k!r} is not one this reader knows: {sorted(RAW_DTYPES)}")
        sizes.append((f"raw.{k}", RAW_DTYPES[k], raw_sizes[k]))
    for name, dtype, count in sizes:
        dtype = np.dtype(dtype).newbyteorder("<")
        offset += -offset % dtype.itemsize
        if offset + count * dtype.itemsize > len(blob):
            raise EPRFormatError(f"the file is too short for its '{name}' section")
        arrays[name] = np.frombuffer(blob, dtype, count, offset)
        offset += count * dtype.itemsize
    arrays["packed"] = np.frombuffer(blob, np.uint8, len(blob) - offset, offset)
    if bit_offset and arrays["packed"].size < bit_offset // 8 + 8:
        raise EPRFormatError("the file is too short for its packed groups")
    return meta, arrays




def crc32(data: bytes | bytearray | memoryview, value: int = 0, parts: int | None = None) -> int:
    """``zlib.crc32(data, value)``; a large buffer in up to ``parts`` (default: :func:`.latents.decode_processes`)
    parts at once (zlib releases the GIL), joined by the compiled ``crc32_combine`` (in one pass without it)."""
    view = memoryview(data).cast("B")
    parts = min(parts or decode_processes(), len(view) // CRC_PART_BYTES)
    combine = getattr(native(), "crc32_combine", None)  # None also under an older hf_epr's compiled module
    if parts < 2 or combine is None:
        return zlib.crc32(view, value)
    cuts = [len(view) * k // parts for k in range(parts + 1)]
    with ThreadPoolExecutor(parts - 1) as pool:
        rest = pool.map(lambda k: zlib.crc32(view[cuts[k]: cuts[k + 1]]), range(1, parts))
        crc = zlib.crc32(view[: cuts[1]], value)  # the first part here meanwhile
        rest = list(rest)
    for k, part in enumerate(rest, 1):
        crc = combine(crc, part, cuts[k + 1] - cuts[k])
    return crc


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


def parse_container(data: bytes | mmap.mmap) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Check a container's bytes and return (description, arrays, viewing ``data`` where they can). Raises
    :class:`EPRFormatError`."""
    if len(data) > MAX_FILE_BYTES:
        raise EPRFormatError(f"the file is {len(data)} bytes, more than the {MAX_FILE_BYTES} this reader accepts")
    n = _header_length(data)
    try:
        header = json.loads(data[8: 8 + n])
        stored = None if BLOB in header else header["__metadata__"]["epr_sha256"]
    except (ValueError, KeyError, TypeError) as err:
        raise EPRFormatError(f"the file's header is not an hf_epr header ({err!r}); was it written by hf_epr?") from None
    if BLOB in header:  # version 3: one uint8 tensor, read in place
        entry, size = header[BLOB], len(data) - 8 - n
        if set(header) != {BLOB} or entry != {"dtype": "U8", "shape": [size], "data_offsets": [0, size]} \
                or data[8 + n: 8 + n + len(MAGIC)] != MAGIC or size < len(MAGIC) + CHECKSUM_BYTES:
            raise EPRFormatError("the file's header does not describe one hf_epr 'epr' byte tensor filling the file")
        start, end = 8 + n + len(MAGIC), 8 + n + len(MAGIC) + CHECKSUM_BYTES
        crc = crc32(memoryview(data)[end:], zlib.crc32(bytes(CHECKSUM_BYTES), zlib.crc32(data[:start])))
        if crc.to_bytes(CHECKSUM_BYTES, "little") != data[start: end]:
            raise EPRFormatError("checksum mismatch: the file is corrupt (a byte changed or it was truncated); "
                                 "download or save it again")
        meta, arrays = _parse_v3(memoryview(data)[end:])
    else:  # versions 1 and 2
        data = bytes(data)
        if digest_of(data) != stored:
            raise EPRFormatError("checksum mismatch: the file is corrupt (a byte changed or it was truncated); "
                                 "download or save it again")
        try:
            from safetensors.numpy import load
            arrays = load(data)
        except Exception as err:  # safetensors raises its own error types
            raise EPRFormatError(f"the safetensors payload is invalid: {err}") from None
        meta = _description(header["__metadata__"], arrays)
        if isinstance(meta, dict) and isinstance(meta.get("groups"), list):
            meta["groups"] = [[*g, 0] if isinstance(g, list) else g for g in meta["groups"]]  # all entropy coded
        arrays["packed"] = np.zeros(0, np.uint8)
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
    if not size:
        return parse_container(b"")
    with open(path, "rb") as f:  # mapped, not copied: the arrays view the file's cached pages
        mapped = MappedFile(f.fileno(), 0, access=mmap.ACCESS_READ)
    meta, arrays = parse_container(mapped)
    mapped.release()  # the checksum's pass touched every page: decoding maps back each part it reads, then drops it
    return meta, arrays


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
    packed_bits = 8 * max(0, arrays["packed"].size - 8)
    for g in groups:
        _need(isinstance(g, list) and len(g) == 5 and all(_int(v, -(1 << 33), 1 << 34) for v in g),
              f"group entry {g!r} must be [lo, n_symbols or width, offset, n_latents, mode]")
        lo, n_sym, off, count, mode = g
        _need(0 <= count <= MAX_TENSOR_NUMEL, f"group latent count {count} is absurd")
        if mode == 0:
            _need(2 <= n_sym <= (1 << precision) and 0 <= off and off + n_sym <= n_tables,
                  f"group table [{off}, {off}+{n_sym}) is outside the {n_tables} stored counts")
            _need(-(1 << 31) <= lo <= (1 << 31) - n_sym, f"group range starting at {lo} does not fit int32")
        else:
            _need(mode == 1 and 0 <= n_sym <= 32 and off % 8 == 0 and off + n_sym * count <= packed_bits,
                  f"packed group of {count} x {n_sym} bits at bit {off} is outside the packed section")
            _need(-(1 << 31) <= lo and lo + (1 << n_sym) - 1 <= (1 << 31) - 1 if count else True,
                  f"packed group starting at {lo} does not fit int32")
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
        n_coded = sum(1 for g in groups if g[4] == 0)
        _need(sum(x[0] for x in streams) == arrays["coded"].size and sum(x[1] for x in streams) == n_coded,
              "the streams do not cover the coded words and the entropy-coded groups exactly")
    total_escapes = meta.get("n_escapes")
    _need(_int(total_escapes) and total_escapes == arrays["escapes"].size, "escape count disagrees with payload")
