"""Read and decode an EPR-compressed checkpoint.

This module is self-contained on purpose: ``save_pretrained`` copies it verbatim into every
compressed repo as ``epr_loader.py``, so ``AutoModelForImageClassification.from_pretrained(repo,
trust_remote_code=True)`` works with only torch, transformers, numpy, safetensors and constriction
installed. It reads safetensors + JSON only (no pickle, no eval/exec, no network of its own) and
validates everything before allocating.

File layout (``epr_weights.safetensors``, format version 2), all little-endian:

* ``meta``    uint8: the JSON description (groups, tensors, precision, coder), zlib-compressed;
* ``coded``   uint32 words of the ANS streams holding every integer latent, group by group (one stream,
  or several listed in the description's ``streams`` as [n_words, n_groups], decodable in parallel);
* ``tables``  uint8 LEB128 varints: the symbol counts of every group's table, concatenated (each table
  sums to ``2**precision``, all counts >= 1, the last symbol of each table is the escape symbol);
* ``escapes`` int32 values of latents outside their table's range, in coding order (absent when none);
* ``params``  float32 decoder parameters (log step sizes, shifts);
* ``raw.<dtype>`` raw tensors and buffers of one dtype, concatenated.

The safetensors metadata holds ``format`` ("hf_epr") and ``epr_sha256``, the sha256 of the whole file
with that digest replaced by 64 zeros. Version 1 files (the JSON as the metadata entry ``epr``, always
an ``escapes`` tensor) are still read.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import zlib
from typing import Any

import numpy as np
import torch

FORMAT_NAME = "hf_epr"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
META_TENSOR = "meta"
MAX_META_BYTES = 1 << 26  # 64 MiB of JSON
WEIGHTS_NAME = "epr_weights.safetensors"
CONFIG_MODEL_TYPE = "epr_compressed"
MAX_FILE_BYTES = 1 << 36  # 64 GiB
MAX_TENSOR_NUMEL = 1 << 32
MAX_TOTAL_NUMEL = 1 << 34
RAW_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": None, "int64": np.int64,
              "int32": np.int32, "bool": np.bool_, "uint8": np.uint8}
_DIGEST_RE = re.compile(rb'"epr_sha256":"([0-9a-f]{64})"')


class EPRError(Exception):
    """Base class of every error hf_epr raises on purpose."""


class EPRFormatError(EPRError, ValueError):
    """A compressed file or folder is missing, corrupt, or not in a format this version reads."""


# ---------------------------------------------------------------------------------------------
# Container
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
    """Check a container's bytes and return (metadata, arrays). Raises :class:`EPRFormatError`."""
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
    """Read and check a container file."""
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
    """Check that metadata and arrays agree, before anything is decoded or allocated."""
    expect = {"coded": np.uint32, "tables": np.uint8, "escapes": np.int32, "params": np.float32}
    for name, dtype in expect.items():
        _need(name in arrays, f"tensor '{name}' is missing")
        _need(arrays[name].dtype == dtype and arrays[name].ndim == 1, f"tensor '{name}' has the wrong dtype/shape")
    precision = meta.get("precision")
    _need(_int(precision, 8, 16), "precision must be an integer in [8, 16]")
    groups = meta.get("groups")
    _need(isinstance(groups, list), "'groups' must be a list")
    n_tables = len(table_counts(arrays["tables"]))
    total_latents = total_escapes = 0
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
    coded_numel = 0
    total = 0
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
        kind = t.get("kind")
        if kind == "raw":
            key = f"raw.{t.get('dtype')}"
            _need(key in arrays, f"{t['name']}: tensor '{key}' is missing")
            off = t.get("offset")
            _need(_int(off) and off + numel <= arrays[key].size, f"{t['name']}: raw slice outside '{key}'")
            continue
        _need(kind in ("affine", "dct"), f"{t['name']}: unknown kind {kind!r}")
        gids = t.get("groups")
        _need(isinstance(gids, list) and gids and all(_int(i, 0, len(groups) - 1) for i in gids),
              f"{t['name']}: bad group ids")
        p = t.get("params")
        n_params = 2 if kind == "affine" else len(gids)
        _need(_int(p) and p + n_params <= arrays["params"].size, f"{t['name']}: parameters outside 'params'")
        if kind == "dct":
            _need(len(shape) == 4, f"{t['name']}: a dct tensor must be 4-D")
            cg = t.get("coef_group")
            _need(isinstance(cg, list) and len(cg) == shape[2] * shape[3]
                  and all(_int(i, 0, len(gids) - 1) for i in cg), f"{t['name']}: bad coef_group")
            for local in range(len(gids)):
                per = cg.count(local) * shape[0] * shape[1]
                _need(groups[gids[local]][3] == per, f"{t['name']}: group {gids[local]} holds "
                      f"{groups[gids[local]][3]} latents, the tensor needs {per}")
        else:
            _need(len(gids) == 1 and groups[gids[0]][3] == numel,
                  f"{t['name']}: its group holds a different number of latents than its {numel} elements")
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


# ---------------------------------------------------------------------------------------------
# Entropy decoding
# ---------------------------------------------------------------------------------------------


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


def categorical(counts: np.ndarray, precision: int):
    """The constriction model of one stored integer table (exact dyadic floats, perfect=False)."""
    import constriction

    probs = counts.astype(np.float64) / float(1 << precision)
    return constriction.stream.model.Categorical(probs, perfect=False)


CODERS = {  # the "coder" entry of the description -> how to open the stream for decoding
    "constriction.stream.stack.AnsCoder/Categorical(perfect=False)": "stack.AnsCoder",  # version 2
    "constriction.stream.queue.RangeEncoder/Categorical(perfect=False)": "queue.RangeDecoder",  # version 1
}


def open_stream(coder: str, words: np.ndarray):
    """A constriction decoder over ``words`` for a file written with ``coder``."""
    import constriction

    if coder not in CODERS:
        raise EPRFormatError(f"unknown entropy coder {coder!r}; this reader knows {sorted(CODERS)}")
    module, cls = CODERS[coder].split(".")
    return getattr(getattr(constriction.stream, module), cls)(np.ascontiguousarray(words, np.uint32))


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
    decoder = open_stream(meta.get("coder"), words)
    for i in groups:
        lo, n_sym, off, count = meta["groups"][i]
        if count:
            model = categorical(counts[off: off + n_sym], meta["precision"])
            out[starts[i]: starts[i] + count] = decoder.decode(model, count)


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
    import mmap

    precision, groups = meta["precision"], meta["groups"]
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


# ---------------------------------------------------------------------------------------------
# Decoders (shared with training: the same functions compute the weights in both places)
# ---------------------------------------------------------------------------------------------


def dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix D (n x n, float32): coefficients = D @ x, x = D.T @ coefficients."""
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    d = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    d[0] /= np.sqrt(2.0)
    return torch.from_numpy(d.astype(np.float32))


def affine_decode(q: torch.Tensor, log_step: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """w = step * q + shift."""
    return torch.exp(log_step) * q + shift


def dct_decode(q: torch.Tensor, log_steps: torch.Tensor, coef_group: torch.Tensor) -> torch.Tensor:
    """k x k kernels from quantized DCT coefficients: W = Dh.T @ (step * q) @ Dw per slice, computed as one
    matrix product of the flattened slices with kron(Dh, Dw) (a single GEMM instead of two per slice)."""
    kh, kw = q.shape[-2:]
    steps = torch.exp(log_steps)[coef_group]
    basis = torch.kron(dct_matrix(kh), dct_matrix(kw)).to(q.device)  # [(u, v), (i, j)] = Dh[u, i] * Dw[v, j]
    return ((q.reshape(*q.shape[:-2], kh * kw) * steps) @ basis).view(q.shape)


def iter_decoded(meta: dict[str, Any], arrays: dict[str, np.ndarray], latents: list[np.ndarray] | None = None):
    """Yield (names, tensor) for every stored tensor (names: the tensor's name and its tied aliases)."""
    latents = decode_latents(meta, arrays) if latents is None else latents
    params = torch.from_numpy(arrays["params"].copy())
    for t in meta["tensors"]:
        shape = tuple(t["shape"])
        if t["kind"] == "raw":
            flat = arrays[f"raw.{t['dtype']}"]
            value = torch.from_numpy(flat[t["offset"]: t["offset"] + math.prod(shape)].copy()).view(shape)
        elif t["kind"] == "affine":
            q = torch.from_numpy(latents[t["groups"][0]].astype(np.float32)).view(shape)
            p = t["params"]
            value = affine_decode(q, params[p], params[p + 1])
        else:
            q = torch.from_numpy(dct_latents(t, latents)).view(shape)
            p = t["params"]
            value = dct_decode(q, params[p: p + len(t["groups"])], torch.tensor(t["coef_group"]))
        yield [t["name"], *t.get("aliases", [])], value


def decode_state_dict(meta: dict[str, Any], arrays: dict[str, np.ndarray],
                      latents: list[np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of the checkpoint, by name (aliases of shared tensors included)."""
    return {name: value for names, value in iter_decoded(meta, arrays, latents) for name in names}


def dct_latents(t: dict[str, Any], latents: list[np.ndarray]) -> np.ndarray:
    """Reassemble a dct tensor's latents (float32, tensor shape) from its groups."""
    o, i, kh, kw = t["shape"]
    cg = np.asarray(t["coef_group"])
    q = np.empty((o * i, kh * kw), np.float32)
    for local, gid in enumerate(t["groups"]):
        cols = np.flatnonzero(cg == local)
        q[:, cols] = latents[gid].reshape(o * i, len(cols))
    return q


# ---------------------------------------------------------------------------------------------
# transformers entry points
# ---------------------------------------------------------------------------------------------

from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel  # noqa: E402


class EPRCompressedConfig(PreTrainedConfig):
    """config.json of a compressed repo: the base model's config plus the ``epr`` section."""

    model_type = CONFIG_MODEL_TYPE
    base_config: dict | None = None
    epr: dict | None = None

    def to_base_config(self) -> PreTrainedConfig:
        """The base architecture's own config object."""
        if not isinstance(self.base_config, dict) or "model_type" not in self.base_config:
            raise EPRFormatError("config.json has no 'base_config' with a 'model_type': not an hf_epr repo")
        base = dict(self.base_config)
        return AutoConfig.for_model(base.pop("model_type"), **base)


def build_base_model(config: PreTrainedConfig, skip_init: bool = False) -> PreTrainedModel:
    """An instance of the base architecture named in ``config.architectures``.

    ``skip_init`` leaves the weights uninitialised (faster): only for callers that overwrite every tensor.
    """
    import contextlib

    import transformers

    names = config.architectures or []
    cls = getattr(transformers, names[0], None) if names else None
    context = contextlib.nullcontext()
    if skip_init:
        try:
            from transformers.initialization import no_init_weights
            context = no_init_weights()
        except ImportError:  # older transformers: initialise normally
            pass
    with context:
        if cls is None:
            return transformers.AutoModelForImageClassification.from_config(config)
        return cls(config)


def resolve_file(repo: str | os.PathLike, filename: str, **hub_kwargs: Any) -> str:
    """Local path of one file of a compressed repo (a folder or a Hub id)."""
    if os.path.isdir(repo):
        path = os.path.join(repo, filename)
        if not os.path.isfile(path):
            raise EPRFormatError(f"{repo} has no {filename}: it is not an hf_epr compressed repo")
        return path
    from transformers.utils import cached_file

    keep = {k: hub_kwargs[k] for k in ("cache_dir", "force_download", "proxies", "token", "revision",
                                        "local_files_only", "subfolder") if k in hub_kwargs}
    return cached_file(str(repo), filename, **keep)


def load_decoded(model: PreTrainedModel, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> PreTrainedModel:
    """Decode a checkpoint into ``model`` tensor by tensor (names and shapes must match exactly)."""
    own = model.state_dict()
    stored = {name: t["shape"] for t in meta["tensors"] for name in (t["name"], *t.get("aliases", []))}
    missing, extra = sorted(set(own) - set(stored)), sorted(set(stored) - set(own))
    if missing or extra:
        raise EPRFormatError(f"the file does not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for name, shape in stored.items():
        if tuple(own[name].shape) != tuple(shape):
            raise EPRFormatError(f"{name}: file shape {tuple(shape)} != model shape {tuple(own[name].shape)}")
    # the decoded tensors become the model's storage (no copy into the uninitialized tensors it was built with)
    targets = {**dict(model.named_parameters(remove_duplicate=False)),
               **dict(model.named_buffers(remove_duplicate=False))}
    with torch.no_grad():
        for names, value in iter_decoded(meta, arrays):
            for name in names:
                if name in targets:
                    targets[name].data = value.to(targets[name].dtype)
                else:  # a state entry that is not a plain parameter or buffer (rare): copy in place
                    own[name].copy_(value.to(own[name].dtype))
    return model


class EPRCompressedForImageClassification(PreTrainedModel):
    """Loader: ``from_pretrained`` returns the decoded base model (e.g. ResNetForImageClassification)."""

    config_class = EPRCompressedConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):  # noqa: D102
        if not isinstance(config, EPRCompressedConfig):
            config = EPRCompressedConfig.from_pretrained(pretrained_model_name_or_path, **kwargs)
        base_config = config.to_base_config()
        meta, arrays = read_container(resolve_file(pretrained_model_name_or_path, WEIGHTS_NAME, **kwargs))
        model = build_base_model(base_config, skip_init=True)  # every tensor is overwritten from the file
        load_decoded(model, meta, arrays)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        if isinstance(dtype, torch.dtype):
            model = model.to(dtype)
        return model.eval()
