"""The compiled decoding loops (hf_epr/format/_native.c) give exactly what constriction and NumPy give, and reject
corrupt input with a typed error (the compiled training loops: tests/test_native_train.py)."""

import os
import shutil
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import torch

import hf_epr.format.coders as coders
from hf_epr import EPRConfig, EPRFormatError, EPRModel
from hf_epr.format import WEIGHTS_NAME, decode_state_dict, decoders, read_container
from hf_epr.format.coders import ANS, CODERS, quantize_pmf, unpack_bits
from hf_epr.testing import tiny_model

native = coders.native()
needs_native = pytest.mark.skipif(native is None, reason="the compiled decoder was not built (no C compiler)")


@pytest.mark.parametrize("source,module,probe", [
    ("hf_epr/format/_native.c", native, "from hf_epr.format.coders import native; print(native() is None)"),
    ("hf_epr/_native_train.c", decoders._native_train,
     "from hf_epr.format import decoders; print(decoders._native_train is None)"),
])
def test_the_compiled_loops_are_built_where_a_compiler_is(source, module, probe):
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}) here: hf_epr decodes and trains without its compiled loops")
    assert module is not None, f"pip install -e . should have built {source}"
    out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "HF_EPR_NATIVE": "0"},
                         capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "True"  # HF_EPR_NATIVE=0 rules them out


def random_stream(rng, n_groups, with_escapes):
    """(words, groups rows, escapes, expected out) of one ANS stream of groups with random tables."""
    groups, rows, escapes, expected, start = [], [], [], [], 0
    for _ in range(n_groups):
        n_sym = int(rng.integers(2, 300))
        precision = int(rng.integers(n_sym.bit_length() + 1, 17))
        counts = quantize_pmf(rng.random(n_sym) ** 4, precision).astype(np.int64)
        count = int(rng.choice([0, 1, 7, int(rng.integers(1, 5000))]))
        lo = int(rng.integers(-100, 100))
        symbols = rng.choice(n_sym, size=count, p=counts / counts.sum()).astype(np.int32)
        values = symbols + lo
        escaped = symbols == n_sym - 1
        values[escaped] = rng.integers(10_000, 20_000, int(escaped.sum()))
        groups.append((symbols, counts))
        rows.append([counts, n_sym, count, start, lo, len(escapes)])
        escapes.extend(values[escaped].tolist())
        expected.append(values if with_escapes else symbols)
        start += count
    return CODERS[ANS].encode(groups, 16), rows, escapes, expected


def spec_of(rows, table_offsets, escape_offset, out_offset, with_escapes, escape_ends):
    return np.array([[table_offsets[i], r[1], r[2], out_offset + r[3], r[4]]
                     + ([escape_offset + r[5], escape_offset + escape_ends[i]] if with_escapes else [-1, -1])
                     for i, r in enumerate(rows)], np.int64).reshape(-1, 7)


def streams_case(seed, n_streams, with_escapes):
    """Several random streams laid out as a file lays them out: (streams, counts, escapes, out size, expected)."""
    rng = np.random.default_rng(seed)
    streams, tables, escapes, expected, table_size, out_size = [], [], [], [], 0, 0
    for _ in range(n_streams):
        words, rows, esc, values = random_stream(rng, int(rng.integers(0, 6)), with_escapes)
        offsets = []
        for r in rows:
            offsets.append(table_size)
            tables.append(r[0])
            table_size += r[1]
        ends = [r[5] for r in rows[1:]] + [len(esc)]
        streams.append((words, spec_of(rows, offsets, len(escapes), out_size, with_escapes, ends)))
        escapes.extend(esc)
        expected.extend(values)
        out_size += sum(r[2] for r in rows)
    counts = np.concatenate(tables) if tables else np.zeros(0, np.int64)
    flat = np.concatenate(expected).astype(np.int32) if expected else np.zeros(0, np.int32)
    return streams, counts, np.array(escapes, np.int32), out_size, flat


@needs_native
@pytest.mark.parametrize("with_escapes", [True, False])
@pytest.mark.parametrize("seed", range(6))
def test_streams_decode_as_constriction_decodes_them(seed, with_escapes):
    streams, counts, escapes, size, expected = streams_case(seed, n_streams=1 + seed, with_escapes=with_escapes)
    out = np.full(size, -7, np.int32)
    native.ans_decode(streams, counts, escapes, out)  # 1 to 6 streams: decoded 4 at a time, then the rest
    assert np.array_equal(out, expected)
    if not with_escapes:  # table indices: constriction reads the same words as the same symbols
        for words, spec in streams:
            tables = [(counts[r[0]: r[0] + r[1]], int(r[2])) for r in spec]
            for symbols, r in zip(CODERS[ANS].decode(words, tables, 16), spec):
                assert np.array_equal(symbols, out[r[3]: r[3] + r[2]])


@needs_native
def test_corrupt_streams_are_value_errors_not_crashes():
    streams, counts, escapes, size, _ = streams_case(3, n_streams=3, with_escapes=True)
    out = np.zeros(size, np.int32)
    words, spec = streams[1]
    cases = {
        "truncated": [(words[: len(words) // 2], spec)],
        "extra word": [(np.append(words, np.uint32(5)), spec)],
        "zero last word": [(np.append(words, np.uint32(0)), spec)],
        "escapes left over": [(words, spec + np.array([0, 0, 0, 0, 0, 0, 1]))],
        "group past the output": [(words, spec + np.array([0, 0, 0, size, 0, 0, 0]))],
        "table past the counts": [(words, spec + np.array([counts.size, 0, 0, 0, 0, 0, 0]))],
    }
    for name, case in cases.items():
        if not case[0][1].size or not case[0][1][:, 2].any():
            continue
        with pytest.raises(ValueError):
            native.ans_decode(case, counts, escapes, out)
    for wrong in (["not a pair"], [(words, spec[:, :6].copy())]):
        with pytest.raises((TypeError, ValueError)):
            native.ans_decode(wrong, counts, escapes, out)
    flipped = words.copy()
    for k in range(0, len(flipped), 3):  # random damage: an error or other symbols, never a crash
        flipped[k] ^= np.uint32(0x5A5A5A5A)
    try:
        native.ans_decode([(flipped, spec)], counts, escapes, out)
    except ValueError:
        pass


@pytest.mark.parametrize("width", [1, 3, 8, 13, 17, 31, 32])
def test_unpacking_is_the_same_compiled_or_not(width, monkeypatch):
    rng = np.random.default_rng(width)
    count, lo, offset = 1001, -(1 << (width - 1)), 24
    values = rng.integers(0, 1 << width, count, dtype=np.int64)
    packed = coders.pack_bits(values + lo, lo, width)
    data = np.concatenate([np.zeros(offset // 8, np.uint8), packed, np.zeros(8, np.uint8)])
    results = []
    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr(coders, "_native", None)
        out = np.zeros(count, np.int32)
        unpack_bits(data, offset, width, count, out, lo)
        results.append(out)
    assert np.array_equal(results[0], values + lo) and np.array_equal(results[1], values + lo)
    if native is not None:
        with pytest.raises(EPRFormatError, match="past the end"):
            unpack_bits(data[:-9], offset, width, count, np.zeros(count, np.int32), lo)


@needs_native
def test_populate_faults_in_a_part_and_keeps_what_it_holds():
    import mmap

    page = mmap.PAGESIZE
    buffer = mmap.mmap(-1, 8 * page, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    values = np.frombuffer(buffer, np.uint8)
    values[page + 3] = 7  # a page already written
    native.populate(buffer, page + 1, 5 * page + 9)  # unaligned ends
    native.populate(buffer, -5, 100 * page)  # clipped to the buffer
    native.populate(buffer, 6 * page, 2 * page)  # empty
    expected = np.zeros(8 * page, np.uint8)
    expected[page + 3] = 7
    np.testing.assert_array_equal(values, expected)
    with pytest.raises(BufferError):
        native.populate(b"read only", 0, 4)


@needs_native
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the resident size from /proc")
def test_populate_makes_the_pages_resident():
    import mmap

    def resident_anonymous_mb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 1024

    buffer = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    before = resident_anonymous_mb()
    native.populate(buffer, 0, 48 << 20)
    assert resident_anonymous_mb() - before > 40


@needs_native
def test_affine_in_place_rounds_as_torch_does():
    rng = np.random.default_rng(0)
    for scale in (3, 1000, 1 << 24, 1 << 30):
        q = rng.integers(-scale, scale, 100_003).astype(np.int32)
        for step, shift in ((0.0123, -0.004), (3.3e-5, 0.7), (1.0, 0.0)):
            step32, shift32 = torch.tensor(step), torch.tensor(shift)
            expected = (torch.from_numpy(q).float() * step32 + shift32).numpy()
            weights = q.copy()
            native.affine_in_place(weights, float(step32), float(shift32))
            assert np.array_equal(weights.view(np.float32).view(np.int32), expected.view(np.int32))


@pytest.mark.parametrize("family", ["resnet", "vit"])
def test_a_saved_model_decodes_to_the_same_tensors_compiled_or_not(family, tmp_path, monkeypatch):
    model = EPRModel.from_base(tiny_model(family), EPRConfig(init_step_ratio=0.05)).eval()
    model.save_pretrained(tmp_path)
    compiled = decode_state_dict(*read_container(tmp_path / WEIGHTS_NAME))
    monkeypatch.setattr(coders, "_native", None)
    plain = decode_state_dict(*read_container(tmp_path / WEIGHTS_NAME))
    assert compiled.keys() == plain.keys()
    assert all(torch.equal(compiled[k], plain[k]) for k in compiled)
