"""Entropy coders and integer tables: every coder in the table round-trips, tables keep their invariants."""

import numpy as np
import pytest

from hf_epr import EPRFormatError
from hf_epr.format.coders import (CODERS, coder, histogram_table, ideal_bits, quantize_pmf, symbols_of,
                                  table_precision)


@pytest.mark.parametrize("name", sorted(CODERS))
def test_every_coder_round_trips(name):
    rng = np.random.default_rng(0)
    groups = []
    for n, scale in ((500, 2.0), (0, 1.0), (300, 0.3)):  # an empty group in the middle
        values = np.round(rng.laplace(0, scale, n)).astype(np.int32)
        lo, counts = histogram_table(values if n else np.zeros(1, np.int32), 16, 64)
        groups.append((symbols_of(lo, counts, values)[0], counts))
    words = CODERS[name].encode(groups, 16)
    decoded = list(CODERS[name].decode(words, [(c, s.size) for s, c in groups], 16))
    assert all(np.array_equal(d, s) for d, (s, _) in zip(decoded, groups))
    ideal = sum(ideal_bits(0, c, s, 16) for s, c in groups)
    assert 32 * words.size <= ideal + 64 + 32  # within a couple of words of the entropy


def test_unknown_coder_is_a_format_error():
    with pytest.raises(EPRFormatError, match="unknown entropy coder"):
        coder("zlib")


def test_tables_sum_to_the_precision_and_escape_what_they_cannot_hold():
    counts = quantize_pmf(np.array([0.7, 0.2, 0.1, 0.0, 0.0]), 12)
    assert counts.sum() == 1 << 12 and counts.min() >= 1
    values = np.array([0, 1, 1, 2, 500, -400], np.int32)
    lo, counts = histogram_table(values, 16, max_symbols=8)
    symbols, escaped = symbols_of(lo, counts, values)
    assert counts.sum() == 1 << table_precision(values.size, counts.size, 16) == 1 << 5 and counts.size <= 8
    assert sorted(escaped.tolist()) == [-400, 500] and (symbols[[4, 5]] == counts.size - 1).all()
    with pytest.raises(ValueError):
        quantize_pmf(np.ones(1), 16)
