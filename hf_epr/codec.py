"""Encode integer latents against integer tables and write the container (the inverse of loader.py)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import tempfile
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .loader import FORMAT_NAME, FORMAT_VERSION, META_TENSOR, categorical, digest_of


@dataclass
class CodedGroup:
    """One group of integer latents with its quantized table over [lo, lo + n_symbols - 2] + escape."""

    lo: int
    counts: np.ndarray  # uint16, sum 2**precision, last entry = escape symbol
    values: np.ndarray  # int32 latents in coding order


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


def quantize_pmf(pmf: np.ndarray, precision: int) -> np.ndarray:
    """Integer counts (uint16) summing to ``2**precision``, every symbol >= 1, from probabilities.

    ``pmf`` holds the in-range probabilities followed by the escape probability (any remaining mass).
    """
    pmf = np.clip(np.nan_to_num(np.asarray(pmf, np.float64), nan=0.0), 0.0, None)
    n = pmf.size
    total = 1 << precision
    if not 2 <= n <= total // 2:
        raise ValueError(f"a table needs 2..{total // 2} symbols, got {n}")
    pmf = pmf / pmf.sum() if pmf.sum() > 0 else np.full(n, 1.0 / n)
    counts = 1 + np.floor(pmf * (total - n)).astype(np.int64)
    counts[np.argmax(pmf)] += total - counts.sum()
    return counts.astype(np.uint16)


def table_support(values: np.ndarray, max_symbols: int) -> tuple[int, int]:
    """[lo, hi] covering the values, narrowed around the median to at most ``max_symbols - 1`` values."""
    lo, hi = int(values.min()), int(values.max())
    width = max_symbols - 1
    if hi - lo + 1 > width:
        mid = int(np.median(values))
        lo = max(lo, mid - width // 2)
        hi = lo + width - 1
    return lo, hi


def symbols_of(group: CodedGroup) -> tuple[np.ndarray, np.ndarray]:
    """Table indices of a group's values, and the escaped values (outside the table's range)."""
    n_sym = group.counts.size
    idx = group.values.astype(np.int64) - group.lo
    esc = (idx < 0) | (idx >= n_sym - 1)
    idx[esc] = n_sym - 1
    return idx.astype(np.int32), group.values[esc].astype(np.int32)


CODER = "constriction.stream.stack.AnsCoder/Categorical(perfect=False)"
STREAM_SYMBOLS = 1 << 22  # about 0.1 s of decoding: files with more symbols get one stream per this many
MAX_STREAMS = 16


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


def encode_groups(groups: list[CodedGroup], precision: int,
                  streams: list[int] | None = None) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """ANS streams (uint32 words, concatenated) for consecutive runs of ``streams[k]`` groups, the escaped
    values (in decoding order), and ``[n_words, n_groups]`` per stream.

    ANS is a stack: a stream's groups are pushed last to first, each in reverse, so decoding pops them in
    order. (Measured here: ANS decodes 1.2-2x faster than constriction's range decoder at equal size.)
    """
    import constriction

    streams = [len(groups)] if streams is None else streams
    coded = [symbols_of(g) for g in groups]  # (table indices, escaped values) per group
    words, table, first = [], [], 0
    for n in streams:
        encoder = constriction.stream.stack.AnsCoder()
        for g, (sym, _) in zip(reversed(groups[first: first + n]), reversed(coded[first: first + n])):
            if g.values.size:
                encoder.encode_reverse(sym, categorical(g.counts, precision))
        words.append(np.asarray(encoder.get_compressed(), dtype=np.uint32))
        table.append([int(words[-1].size), n])
        first += n
    escapes = [esc for _, esc in coded]
    return (np.concatenate(words) if words else np.zeros(0, np.uint32),
            (np.concatenate(escapes) if escapes else np.zeros(0, np.int32)).astype(np.int32), table)


def ideal_bits(groups: list[CodedGroup], precision: int) -> float:
    """-sum log2 p of every symbol under the stored integer tables."""
    total = 0.0
    for g in groups:
        if g.values.size:
            sym, _ = symbols_of(g)
            total -= float(np.log2(g.counts[sym].astype(np.float64) / (1 << precision)).sum())
    return total


@dataclass
class Container:
    """Everything one ``epr_weights.safetensors`` holds, before serialization."""

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
            "coder": CODER,
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


def size_report(c: Container) -> dict[str, Any]:
    """Per tensor of a container: name, shape, kind, bits (ideal under its tables), bytes (coded bits + table +
    decoder parameters + escapes, or raw bytes); totals from the real serialized size, and ``ideal_bytes``: the
    latents' ideal code length under the stored tables plus the raw tensors (what the file would be with no
    tables, description or coder overhead)."""
    import math

    total = len(c.to_bytes())
    rows, accounted, ideal = [], 0.0, 0.0
    for t in c.tensors:
        numel = math.prod(t["shape"])
        if t["kind"] == "raw":
            nbytes = numel * np.dtype(t["dtype"]).itemsize
            bits = 8.0 * nbytes
        else:
            groups = [c.groups[g] for g in t["groups"]]
            bits = ideal_bits(groups, c.precision)
            n_params = 2 if t["kind"] == "affine" else len(groups)
            n_escapes = sum(symbols_of(g)[1].size for g in groups)
            nbytes = bits / 8 + varints(np.concatenate([g.counts for g in groups])).size + 4 * (n_params + n_escapes)
        accounted += nbytes
        ideal += bits / 8
        rows.append({"name": t["name"], "shape": t["shape"], "kind": t["kind"], "bits": bits, "bytes": nbytes,
                     "bits_per_param": bits / max(1, numel)})
    fp32 = sum(4 * math.prod(t["shape"]) for t in c.tensors)
    return {"tensors": rows, "total_bytes": total, "container_overhead_bytes": total - accounted,
            "ideal_bytes": ideal, "file_over_ideal": total / max(ideal, 1.0), "fp32_bytes": fp32, "ratio": fp32 / total}


def file_size_report(path: str | os.PathLike) -> dict[str, Any]:
    """:func:`size_report` of a saved ``epr_weights.safetensors`` (decodes it)."""
    from .loader import read_container

    return size_report(container_from_file(*read_container(path)))


def container_from_file(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Container:
    """The Container a read file was written from (decodes the latents)."""
    from .loader import decode_latents, table_counts

    counts = table_counts(arrays["tables"])
    latents = decode_latents(meta, arrays)
    c = Container(precision=meta["precision"], tensors=meta["tensors"], params=arrays["params"].tolist())
    c.groups = [CodedGroup(lo, counts[off: off + n].astype(np.uint16), v)
                for (lo, n, off, _), v in zip(meta["groups"], latents)]
    c.raw = {k.removeprefix("raw."): [v] for k, v in arrays.items() if k.startswith("raw.")}
    known = ("format", "version", "precision", "coder", "constriction", "streams", "n_escapes", "groups", "tensors")
    c.extra = {k: v for k, v in meta.items() if k not in known}
    return c


_DTYPES = {np.dtype(k): v for k, v in [("uint32", "U32"), ("uint16", "U16"), ("int32", "I32"), ("int64", "I64"),
                                         ("float32", "F32"), ("float16", "F16"), ("bool", "BOOL"), ("uint8", "U8")]}


def safetensors_bytes(arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """A safetensors file with a deterministic layout (sorted names, metadata first), so saves are byte-stable."""
    header: dict[str, Any] = {"__metadata__": metadata}
    chunks, pos = [], 0
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _DTYPES[a.dtype], "shape": list(a.shape), "data_offsets": [pos, pos + len(raw)]}
        chunks.append(raw)
        pos += len(raw)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head + b"".join(chunks)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write bytes to ``path`` through a temporary file in the same folder and an atomic rename."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
