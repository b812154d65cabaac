"""Entropy coders and their integer tables.

A table is a list of integer counts summing to a power of two (``2**precision`` at most; smaller for small
groups, whose probabilities need fewer bits), every symbol at least 1, for the values
``[lo, lo + n - 2]`` followed by one escape symbol (values outside that range are stored verbatim). The file
stores the tables; decoding reads them and never recomputes probabilities from floats, so it is bit-exact.

``CODERS`` maps the name a file records to its (encode, decode) pair: adding a coder is one entry.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np

from .errors import EPRFormatError

try:  # the compiled loops built with hf_epr (optional: constriction and NumPy decode the same values, slower)
    from . import _native
except ImportError:
    try:  # this module running as a repo's remote code beside an installed hf_epr
        from hf_epr.format import _native
    except ImportError:
        _native = None
if os.environ.get("HF_EPR_NATIVE") == "0":  # to compare, or to rule the compiled loops out
    _native = None


def native():
    """The compiled decoding loops (``_native.c``, built by ``pip install``), or None where they were not built
    or ``HF_EPR_NATIVE=0``."""
    return _native


def categorical(counts: np.ndarray, precision: int | None = None):
    """The constriction model of one stored integer table (exact dyadic floats: its counts over their sum, a power
    of two; ``perfect=False``)."""
    import constriction

    probs = np.asarray(counts, np.float64) / float(np.asarray(counts, np.int64).sum())
    return constriction.stream.model.Categorical(probs, perfect=False)


class Coder(NamedTuple):
    """encode(groups, precision) -> uint32 words, for groups of (symbols, counts) in decoding order;
    decode(words, tables, precision) -> one int32 symbol array per (counts, n_symbols) table, in order;
    decode_into, where :func:`native` has it: decode_into(streams, counts, escapes, out), for (words, groups) streams,
    writes each group (an int64 row: table offset in ``counts``, symbols, count, offset in ``out``, lo, first and
    end escape in ``escapes``, or -1 and -1 for table indices) straight into ``out``, without the GIL; ValueError
    for a corrupt stream."""

    encode: Callable[[list[tuple[np.ndarray, np.ndarray]], int], np.ndarray]
    decode: Callable[[np.ndarray, Iterable[tuple[np.ndarray, int]], int], Iterator[np.ndarray]]
    decode_into: Callable[[list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray, np.ndarray], None] | None = None


def _ans_encode(groups: list[tuple[np.ndarray, np.ndarray]], precision: int) -> np.ndarray:
    import constriction

    coder = constriction.stream.stack.AnsCoder()
    for symbols, counts in reversed(groups):  # a stack: push the last group first, each in reverse
        if symbols.size:
            coder.encode_reverse(symbols, categorical(counts, precision))
    return np.asarray(coder.get_compressed(), np.uint32)


def _range_encode(groups: list[tuple[np.ndarray, np.ndarray]], precision: int) -> np.ndarray:
    import constriction

    coder = constriction.stream.queue.RangeEncoder()
    for symbols, counts in groups:
        if symbols.size:
            coder.encode(symbols, categorical(counts, precision))
    return np.asarray(coder.get_compressed(), np.uint32)


def _stream_decoder(kind: str, cls: str) -> Callable[..., Iterator[np.ndarray]]:
    """The decode function of constriction's ``stream.<kind>.<cls>`` over stored tables."""

    def decode(words: np.ndarray, tables: Iterable[tuple[np.ndarray, int]], precision: int) -> Iterator[np.ndarray]:
        import constriction

        coder = getattr(getattr(constriction.stream, kind), cls)(np.ascontiguousarray(words, np.uint32))
        for counts, n in tables:
            yield coder.decode(categorical(counts, precision), n) if n else np.zeros(0, np.int32)

    return decode


def _ans_decode_into(streams: list[tuple[np.ndarray, np.ndarray]], counts: np.ndarray, escapes: np.ndarray,
                     out: np.ndarray) -> None:
    native().ans_decode(streams, counts, escapes, out)


ANS = "constriction.stream.stack.AnsCoder/Categorical(perfect=False)"
CODERS: dict[str, Coder] = {
    ANS: Coder(_ans_encode, _stream_decoder("stack", "AnsCoder"), _ans_decode_into),  # since format version 2
    "constriction.stream.queue.RangeEncoder/Categorical(perfect=False)":  # format version 1
        Coder(_range_encode, _stream_decoder("queue", "RangeDecoder")),
}


def coder(name: str) -> Coder:
    """The coder a file names; EPRFormatError for one this reader does not know."""
    if name not in CODERS:
        raise EPRFormatError(f"unknown entropy coder {name!r}; this reader knows {sorted(CODERS)}")
    return CODERS[name]


# ---------------------------------------------------------------------------------------------
# Tables
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


def table_precision(n_values: int, n_symbols: int, precision: int) -> int:
    """Bits of a group's table: about 4 counts per value (finer probabilities cannot matter for so few values,
    and smaller counts take fewer bytes in the file), enough for every symbol, at most ``precision``."""
    return max(1, min(precision, max(int(n_values).bit_length() + 2, int(n_symbols).bit_length() + 1)))


def histogram_table(values: np.ndarray, precision: int, max_symbols: int) -> tuple[int, np.ndarray]:
    """(lo, counts): the table of a group's integer values from their own histogram (the cheapest code for
    exactly these values), with the values outside [lo, lo + n - 2] counted on the escape symbol."""
    lo, hi = table_support(values, max_symbols)
    hist = np.bincount(np.clip(values.astype(np.int64) - lo, 0, hi - lo + 1), minlength=hi - lo + 2)
    hist[-1] = int(((values < lo) | (values > hi)).sum())
    return lo, quantize_pmf(hist, table_precision(values.size, hist.size, precision))


def symbols_of(lo: int, counts: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Table indices of ``values`` under a table starting at ``lo``, and the escaped values (outside it)."""
    n_sym = counts.size
    idx = values.astype(np.int64) - lo
    esc = (idx < 0) | (idx >= n_sym - 1)
    idx[esc] = n_sym - 1
    return idx.astype(np.int32), values[esc].astype(np.int32)


def ideal_bits(lo: int, counts: np.ndarray, values: np.ndarray, precision: int) -> float:
    """-sum log2 p of ``values`` under one stored table (the escape symbol's cost included, not the escaped
    values' own bytes)."""
    if not values.size:
        return 0.0
    symbols, _ = symbols_of(lo, counts, values)
    return -float(np.log2(counts[symbols].astype(np.float64) / float(np.asarray(counts, np.int64).sum())).sum())


# ---------------------------------------------------------------------------------------------
# Bit packing: the other way to store a group (fixed-width integers), for groups whose values are nearly uniform
# over their range (e.g. right after wrapping with a fine step), where it is about as small as entropy coding and
# decodes an order of magnitude faster, with no escapes.
# ---------------------------------------------------------------------------------------------

MAX_PACKED_WIDTH = 32
PACK_CHUNK = 1 << 20  # values per vectorized step (bounds the temporary memory)


def packed_width(values: np.ndarray) -> tuple[int, int]:
    """(lo, width): the smallest bit width that holds ``values - lo`` for every value."""
    lo, hi = int(values.min()), int(values.max())
    return lo, max(0, int(hi - lo).bit_length())


def pack_bits(values: np.ndarray, lo: int, width: int) -> np.ndarray:
    """``values - lo`` as ``width``-bit little-endian unsigned integers, concatenated (uint8; the last byte padded)."""
    if width == 0 or values.size == 0:
        return np.zeros(0, np.uint8)
    shifts = np.arange(width, dtype=np.int64)
    chunks = []
    for start in range(0, values.size, PACK_CHUNK):  # PACK_CHUNK is a multiple of 8: every chunk ends on a byte
        v = values[start: start + PACK_CHUNK].astype(np.int64) - lo
        chunks.append(np.packbits(((v[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1), bitorder="little"))
    return np.concatenate(chunks)


def unpack_bits(data: np.ndarray, bit_offset: int, width: int, count: int, out: np.ndarray, lo: int) -> None:
    """Write ``count`` ``width``-bit integers starting at ``bit_offset`` of ``data`` (uint8), plus ``lo``, into
    ``out`` (int32). Compiled where built (one pass, without the GIL); else values i, i + 8, i + 16, ... start at
    the same bit within bytes ``width`` apart, so each of the 8 phases is one strided (unaligned) uint64 read, a
    shift and a mask. ``data`` must hold 8 readable bytes past the last value (the writer pads)."""
    if width == 0 or count == 0:
        out[:count] = lo
        return
    if bit_offset % 8:
        raise EPRFormatError("packed groups start on a byte")
    buffer = np.ascontiguousarray(data, np.uint8)
    if native() is not None and out.dtype == np.int32 and out.flags.c_contiguous and -2**31 <= lo < 2**31:
        try:
            return native().unpack_bits(buffer, bit_offset, width, lo, out[:count])
        except ValueError as err:
            raise EPRFormatError(str(err)) from None
    mask, base = np.uint64((1 << width) - 1), bit_offset // 8
    for phase in range(min(8, count)):
        n = (count - phase + 7) // 8
        start = base + phase * width // 8
        if start + (n - 1) * width + 8 > buffer.size:
            raise EPRFormatError("a packed group runs past the end of its section")
        words = np.ndarray((n,), dtype="<u8", buffer=buffer, offset=start, strides=(width,))
        out[phase::8] = ((words >> np.uint64(phase * width % 8)) & mask).astype(np.int64) + lo
