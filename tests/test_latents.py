"""Decoding a container's latents: several streams and packed groups shared out among processes."""

import mmap
import os
import threading

import numpy as np
import pytest

import hf_epr.format.coders as coders
import hf_epr.format.container as container
import hf_epr.format.latents as latents_module
from hf_epr import EPRError, EPRFormatError
from hf_epr.format.coders import histogram_table
from hf_epr.format.container import CodedGroup, parse_container
from hf_epr.format.latents import decode_latents
from hf_epr.testing import small_container



@pytest.mark.parametrize("compiled", [True, False])
def test_multi_stream_file_decodes_the_same_in_several_processes(monkeypatch, compiled):
    if compiled and coders.native() is None:
        pytest.skip("the compiled decoder was not built")
    if not compiled:
        monkeypatch.setattr(coders, "_native", None)  # constriction in forked processes
    c = small_container()
    peaked = np.round(np.random.default_rng(1).laplace(0, 1.0, 210)).astype(np.int32)
    uniform = np.random.default_rng(2).integers(-500, 500, 3000).astype(np.int32)  # stored bit-packed
    c.groups += [CodedGroup(*histogram_table(peaked, 16, 64), peaked), CodedGroup(*histogram_table(uniform, 16, 64), uniform)]
    c.tensors += [{"name": "c.weight", "shape": [210], "kind": "affine", "groups": [2], "params": 4},
                  {"name": "d.weight", "shape": [3000], "kind": "affine", "groups": [3], "params": 6}]
    c.params += [0.0, 0.0, 0.0, 0.0]
    monkeypatch.setattr(container, "STREAM_SYMBOLS", 250)  # 712 entropy-coded symbols -> 3 streams of whole groups
    meta, arrays = parse_container(c.to_bytes())
    assert [n for _, n in meta["streams"]] == [1, 1, 1] and [g[4] for g in meta["groups"]] == [0, 0, 0, 1]
    for processes in (1, 2, 3):
        latents = decode_latents(meta, arrays, processes=processes)
        assert all(np.array_equal(a, g.values) for a, g in zip(latents, c.groups))

    parent, main = os.getpid(), threading.get_ident()
    name = "_stream_spec" if compiled else "_decode_stream"  # what a worker thread / a child process calls
    real = getattr(latents_module, name)

    def fails_in_worker(*args):
        if os.getpid() != parent or threading.get_ident() != main:
            raise RuntimeError("boom")
        return real(*args)

    monkeypatch.setattr(latents_module, name, fails_in_worker)
    with pytest.raises(EPRFormatError, match="boom" if compiled else "decoding process failed"):
        decode_latents(meta, arrays, processes=2)
    monkeypatch.setenv("HF_EPR_DECODE_PROCESSES", "two")
    with pytest.raises(EPRError, match="HF_EPR_DECODE_PROCESSES"):
        decode_latents(meta, arrays)


def _rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc")
def test_a_mapped_file_gives_its_pages_back_and_keeps_its_bytes(tmp_path):
    data = np.random.default_rng(0).integers(0, 255, 32 << 20, dtype=np.uint8)
    (tmp_path / "f").write_bytes(data.tobytes())
    with open(tmp_path / "f", "rb") as f:
        mapped = latents_module.MappedFile(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = np.frombuffer(memoryview(mapped)[1000:], np.uint8)
    before = _rss_kb()
    assert int(view.sum(dtype=np.int64)) == int(data[1000:].sum(dtype=np.int64))  # every page touched
    touched = _rss_kb()
    latents_module._releaser(view)(0, view.size)
    assert touched - before > 24 << 10 and touched - _rss_kb() > 24 << 10  # mapped in, then dropped
    assert np.array_equal(view, data[1000:])  # still the file's bytes, mapped back as read
    plain = np.frombuffer(data.tobytes(), np.uint8)
    latents_module._releaser(plain)(0, plain.size)  # not a MappedFile: nothing happens
    assert np.array_equal(plain, data)
