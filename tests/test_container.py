"""The coded weights file: round trips, golden files, typed errors on bad input, atomic writes."""

from __future__ import annotations

import json
import os
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import hf_epr.format.coders as coders
import hf_epr.format.container as container
from hf_epr import EPRConfig, EPRFormatError, EPRModel
from hf_epr.format import WEIGHTS_NAME, decode_state_dict, file_size_report
from hf_epr.format.coders import table_counts, varints
from hf_epr.format.container import digest_of, encode_groups, parse_container, safetensors_bytes
from hf_epr.format.decoders import DECODER_KINDS, AffineKind
from hf_epr.format.latents import decode_latents
from hf_epr.models import LeNetConfig, LeNetForImageClassification
from hf_epr.testing import small_container, tiny_inputs, tiny_model, train_a_few_steps


DATA = Path(__file__).parent / "data"



def with_checksum(arrays: dict) -> bytes:
    out = safetensors_bytes(arrays, {"format": "hf_epr", "epr_sha256": "0" * 64})
    return out.replace(b"0" * 64, digest_of(out).encode(), 1)


def rewrite(data: bytes, edit) -> bytes:
    """Re-serialize a container after ``edit(meta, arrays)``, with a valid checksum (a crafted file)."""
    from safetensors.numpy import load
    arrays = load(data)
    meta = json.loads(zlib.decompress(arrays["meta"].tobytes()))
    edit(meta, arrays)
    arrays["meta"] = np.frombuffer(zlib.compress(json.dumps(meta).encode()), np.uint8)
    return with_checksum(arrays)


def test_roundtrip_with_escapes():
    c = small_container()
    meta, arrays = parse_container(c.to_bytes())
    latents = decode_latents(meta, arrays)
    assert all(np.array_equal(a, g.values) for a, g in zip(latents, c.groups))
    assert meta["n_escapes"] == 2
    state = decode_state_dict(meta, arrays)
    assert torch.allclose(state["a.weight"], 0.01 * torch.from_numpy(c.groups[0].values).float().view(20, 15))


@pytest.mark.parametrize("version", [1, 2, 3])
def test_golden_vector(version):
    """Files committed by earlier versions must decode to the committed integers, forever; the encoder
    writes the current version's golden bytes exactly."""
    data = (DATA / f"golden_v{version}.safetensors").read_bytes()
    expected = json.loads((DATA / "golden_expected.json").read_text())
    meta, arrays = parse_container(data)
    assert meta["version"] == version
    latents = decode_latents(meta, arrays)
    assert [a.tolist() for a in latents] == expected["latents"]
    state = decode_state_dict(meta, arrays)
    assert state["b.bias"].tolist() == [1.0, -2.0, 0.5]
    if version == 3:
        assert data == small_container().to_bytes(), "the encoder no longer writes the golden bytes"



GOLDEN_V2 = (DATA / "golden_v2.safetensors").read_bytes()  # the base of crafted version 2 files


def test_description_must_be_small_and_present():
    from safetensors.numpy import load
    arrays = load(GOLDEN_V2)
    bomb = dict(arrays, meta=np.frombuffer(zlib.compress(b" " * (80 << 20), 9), np.uint8))  # 80 MiB of JSON
    with pytest.raises(EPRFormatError, match="larger than"):
        parse_container(with_checksum(bomb))
    with pytest.raises(EPRFormatError, match="description"):
        parse_container(with_checksum({k: v for k, v in arrays.items() if k != "meta"}))
    with pytest.raises(EPRFormatError, match="description"):
        parse_container(with_checksum(dict(arrays, meta=np.frombuffer(b"not zlib", np.uint8))))


CRAFTED = {
    "unknown version": lambda m, a: m.update(version=99),
    "missing tensor": lambda m, a: a.pop("params"),
    "shape disagrees with groups": lambda m, a: m["tensors"][0].update(shape=[20, 16]),
    "absurd shape": lambda m, a: m["tensors"][0].update(shape=[1 << 40, 1 << 20]),
    "absurd group count": lambda m, a: m["groups"][0].__setitem__(3, 1 << 40),
    "table outside payload": lambda m, a: m["groups"][1].__setitem__(2, 10 ** 6),
    "raw slice outside payload": lambda m, a: m["tensors"][2].update(offset=2),
    "escape count": lambda m, a: m.update(n_escapes=5),
    "escapes missing": lambda m, a: a.pop("escapes"),
    "unknown coder": lambda m, a: m.update(coder="zlib"),
    "unknown kind": lambda m, a: m["tensors"][1].update(kind="zip"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_bad_metadata(case):
    with pytest.raises(EPRFormatError):
        meta, arrays = parse_container(rewrite(GOLDEN_V2, CRAFTED[case]))
        decode_latents(meta, arrays)


def blob_file(blob: bytes, extra: dict | None = None) -> bytes:
    """A version 3 file around ``blob`` (after the magic and the checksum) with a valid checksum (crafted)."""
    data = bytearray(safetensors_bytes({"epr": np.frombuffer(container.MAGIC + bytes(4) + blob, np.uint8),
                                        **(extra or {})}))
    start = 8 + int.from_bytes(data[:8], "little") + len(container.MAGIC)
    data[start: start + 4] = zlib.crc32(data).to_bytes(4, "little")
    return bytes(data)


def blob_of(data: bytes) -> bytes:
    from safetensors.numpy import load
    return load(data)["epr"].tobytes()[len(container.MAGIC) + 4:]


def deflated(text: bytes) -> bytes:
    d = zlib.compressobj(9, zlib.DEFLATED, -15)
    return d.compress(text) + d.flush()


def crafted_v3(edit) -> bytes:
    """A version 3 file written from the small container after ``edit(container)``."""
    c = small_container()
    edit(c)
    return c.to_bytes()


def test_version_3_rejects_crafted_files(monkeypatch):
    bomb = deflated(b"\x00" * (80 << 20))
    cases = {
        "description bomb": blob_file(bytes([len(bomb) & 0x7F | 0x80, len(bomb) >> 7 & 0x7F | 0x80,
                                             len(bomb) >> 14]) + bomb),
        "description longer than the file": blob_file(b"\xff\xff\x07" + bytes(10)),
        "description not deflate": blob_file(b"\x04" + b"junk"),
        "sections cut off": blob_file(blob_of(small_container().to_bytes())[:-6]),
        "shape disagrees with groups": crafted_v3(lambda c: c.tensors[0].update(shape=[20, 16])),
        "absurd shape": crafted_v3(lambda c: c.tensors[2].update(shape=[1 << 31, 1 << 31, 1 << 31])),
    }
    cases["a second tensor"] = blob_file(blob_of(small_container().to_bytes()), {"other": np.zeros(4, np.uint8)})
    monkeypatch.setitem(DECODER_KINDS, "zip", AffineKind)  # written under a kind this reader will not know
    cases["unknown kind"] = crafted_v3(lambda c: c.tensors[0].update(kind="zip"))
    monkeypatch.delitem(DECODER_KINDS, "zip")
    for name, data in cases.items():
        with pytest.raises(EPRFormatError):
            meta, arrays = parse_container(data)
            decode_latents(meta, arrays)
            pytest.fail(f"{name}: read without error")


def test_the_lean_container_costs_little_beyond_its_coded_bits():
    c = small_container()
    report = c.size_report()
    coded = sum(g.ideal_bits(c.precision) for g in c.groups) / 8
    assert report["total_bytes"] - coded - 12 - 16 <= 300  # 12 B raw floats, 16 B decoder parameters


def test_fixed_cost_of_a_lenet5_file():
    """A LeNet5-Caffe file (431 k parameters, 11 coded groups): bytes beyond the latents' ideal code length and the
    raw tensors (safetensors header, description, tables, decoder parameters) stay under 600 B."""
    torch.manual_seed(0)
    model = EPRModel.from_base(LeNetForImageClassification(LeNetConfig(variant="lenet5")), EPRConfig(init_step_ratio=1.0))
    report = model.size_report()
    assert 0 < report["total_bytes"] - report["ideal_bytes"] <= 600
    assert report["container_overhead_bytes"] <= 400  # all but the tables


def test_truncated_and_flipped():
    data = small_container().to_bytes()
    for cut in (0, 4, 8, 100, len(data) - 1):
        with pytest.raises(EPRFormatError):
            parse_container(data[:cut])
    flipped = bytearray(data)
    flipped[-5] ^= 0x10
    with pytest.raises(EPRFormatError, match="checksum"):
        parse_container(bytes(flipped))


@pytest.mark.parametrize("size", [0, 1, 63, 64, 1000, 4099])
def test_the_checksum_in_parallel_parts_is_zlibs(size, monkeypatch):
    monkeypatch.setattr(container, "CRC_PART_BYTES", 64)  # small buffers take the parallel path too
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    for parts in (1, 2, 3, 8):
        for value in (0, 0xDEADBEEF):
            assert container.crc32(data, value, parts) == zlib.crc32(data, value)
    with monkeypatch.context() as m:  # without the compiled module: one pass
        m.setattr(container, "native", lambda: None)
        assert container.crc32(data, 5, 3) == zlib.crc32(data, 5)
    assert container.crc32(memoryview(bytearray(data))[3:], 7, 4) == zlib.crc32(data[3:], 7)
    if coders.native() is not None:
        half = size // 2
        combined = coders.native().crc32_combine(zlib.crc32(data[:half]), zlib.crc32(data[half:]), size - half)
        assert combined == zlib.crc32(data)
    # a file checksummed in parts is written and read as one
    flipped = bytearray(small_container().to_bytes())
    assert parse_container(bytes(flipped))[0]["format"] == "hf_epr"
    flipped[-5] ^= 0x10
    with pytest.raises(EPRFormatError, match="checksum"):
        parse_container(bytes(flipped))


def test_fuzz_never_crashes_untyped():
    """>= 1,000 random flips/truncations/garbles: a typed error or the correct decode, nothing else."""
    c = small_container()
    data = c.to_bytes()
    rng = random.Random(1234)
    outcomes = {"error": 0, "ok": 0}
    for i in range(1200):
        b = bytearray(data)
        kind = i % 4
        if kind == 0:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            del b[rng.randrange(len(b)):]
        elif kind == 2:
            start = rng.randrange(len(b))
            b[start:start + rng.randrange(1, 16)] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
        else:
            b.insert(rng.randrange(len(b)), rng.randrange(256))
        try:
            meta, arrays = parse_container(bytes(b))
            latents = decode_latents(meta, arrays)
        except EPRFormatError:
            outcomes["error"] += 1
            continue
        assert all(np.array_equal(a, g.values) for a, g in zip(latents, c.groups))
        outcomes["ok"] += 1
    assert outcomes["error"] >= 1000


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    model = EPRModel.from_base(tiny_model("resnet"), EPRConfig())
    model.save_pretrained(tmp_path)
    before = (tmp_path / WEIGHTS_NAME).read_bytes()
    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(container.os, "fsync", boom)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_table_varints_roundtrip_and_reject_garbage():
    values = np.array([1, 127, 128, 16383, 16384, 65535, 65536, 3])
    encoded = varints(values)
    assert encoded.size == 1 + 1 + 2 + 2 + 3 + 3 + 3 + 1
    assert np.array_equal(table_counts(encoded), values)
    with pytest.raises(EPRFormatError):
        table_counts(encoded[:-2])  # ends inside a value
    with pytest.raises(EPRFormatError):
        table_counts(np.array([0x80, 0x80, 0x80, 0x01], np.uint8))  # a 4-byte count


def test_coded_size_near_ideal_and_report_equals_file(tmp_path):
    model = EPRModel.from_base(tiny_model("convnext"), EPRConfig(rate_lambda=0.1))
    train_a_few_steps(model, tiny_inputs("convnext"), steps=3)
    c = model.to_container()
    words = encode_groups(c.groups, c.precision)[0]
    ideal = sum(g.ideal_bits(c.precision) for g in c.groups) / 8
    assert words.nbytes <= 1.01 * ideal + 4 * len(c.groups) + 8
    report = model.size_report()
    model.save_pretrained(tmp_path)
    assert report["total_bytes"] == (tmp_path / WEIGHTS_NAME).stat().st_size
    assert {r["kind"] for r in report["tensors"]} >= {"affine", "dct", "raw"}
    assert abs(sum(r["bytes"] for r in report["tensors"]) + report["container_overhead_bytes"]
               - report["total_bytes"]) < 1e-6
    assert report["ideal_bytes"] == pytest.approx(ideal + sum(r["bytes"] for r in report["tensors"] if r["kind"] == "raw"))
    assert 1.0 < report["file_over_ideal"] == report["total_bytes"] / report["ideal_bytes"]
    assert file_size_report(tmp_path / WEIGHTS_NAME) == report  # the saved file reports the same


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        EPRModel.from_base(tiny_model("resnet"), EPRConfig()).save_pretrained(tmp_path)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes and set(modes.values()) == {0o666 & ~umask}, modes
