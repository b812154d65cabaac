"""Decoder kinds: the fused straight-through decoder (one tensor, or several together), the DCT transform, and
adding a kind."""

import numpy as np
import pytest
import torch

from hf_epr import EPRCompressedForImageClassification, EPRConfig, EPRFormatError, EPRModel
from hf_epr.format import WEIGHTS_NAME, read_container
from hf_epr.format import decoders
from hf_epr.format.decoders import (DECODER_KINDS, AffineKind, DCTKind, DecoderKind, _QuantizeSTE, dct_matrix,
                                    decoder_for_entry, quantize_together, register_decoder_kind, ste_round)
from hf_epr.testing import tiny_inputs, tiny_model, train_a_few_steps


def test_fused_affine_decoder_matches_autograd_of_the_formula():
    torch.manual_seed(0)
    w = torch.randn(300, 200) * 0.05 + 0.01
    kind = AffineKind(w.shape)
    grads = []
    for fused in (True, False):
        z = w.clone().requires_grad_()
        params = kind.initial_params(w, 1 / 64).requires_grad_()
        out = kind.forward(z, params) if fused else kind.decode(ste_round(kind.units(z, params)), params)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        grads.append((out.detach(), z.grad, params.grad.clone()))
    (a, gz_a, gp_a), (b, gz_b, gp_b) = grads
    assert torch.equal(a, b)  # the same weights
    assert torch.allclose(gz_a, gz_b) and torch.allclose(gp_a[0], gp_b[0], rtol=1e-2, atol=1e-6)
    assert float(gp_a[1]) == 0.0 and abs(float(gp_b[1])) < 1e-2  # zero in closed form; float noise through autograd


def test_dct_decode_is_the_two_sided_transform():
    q = torch.randint(-9, 10, (8, 4, 5, 5)).float()
    log_steps = torch.tensor([-3.0, -2.0, -1.5])
    groups = [0] * 5 + [1] * 10 + [2] * 10
    steps = torch.exp(log_steps)[groups].view(5, 5)
    reference = dct_matrix(5).t() @ (steps * q) @ dct_matrix(5)
    assert torch.allclose(DCTKind(q.shape, groups).decode(q, log_steps), reference, atol=1e-5)


class RowAffineKind(DecoderKind):
    """A toy kind: one step, one shift and one coding group per row (per element of a 1-D tensor's only row)."""

    name = "row_affine"

    def group_pattern(self) -> np.ndarray:
        if len(self.shape) == 1:
            return np.zeros((1,), np.int64)
        return np.arange(self.shape[0]).reshape(-1, *[1] * (len(self.shape) - 1))


@pytest.fixture
def row_affine():
    register_decoder_kind(RowAffineKind)
    yield RowAffineKind
    DECODER_KINDS.pop(RowAffineKind.name)


def test_a_new_decoder_kind_is_one_class(row_affine, tmp_path):
    """Registered from here, the toy kind trains, is coded (a table per row), validated, loaded and decoded."""
    model = EPRModel.from_base(tiny_model("vit"), EPRConfig(dense_decoder="row_affine", rate_lambda=0.1,
                                                            init_step_ratio=0.05))
    assert {e.kind.name for e in model.entries} == {"row_affine", "dct"}
    train_a_few_steps(model, tiny_inputs("vit"), steps=3)
    model.save_pretrained(tmp_path)
    meta, _ = read_container(tmp_path / WEIGHTS_NAME)
    head = next(t for t in meta["tensors"] if t["name"] == "classifier.weight")
    assert head["kind"] == "row_affine" and len(head["groups"]) == head["shape"][0] == 4
    again = EPRModel.from_pretrained(tmp_path)
    a, b = model.integer_latents(), again.integer_latents()
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = EPRCompressedForImageClassification.from_pretrained(tmp_path)
    x = tiny_inputs("vit")
    with torch.no_grad():
        assert (plain(pixel_values=x).logits - model(pixel_values=x).logits).abs().max() <= 1e-5


def test_layouts_are_checked():
    with pytest.raises(EPRFormatError, match="4-D"):
        DCTKind((3, 3), coef_group=[0] * 9)
    with pytest.raises(EPRFormatError, match="coef_group"):
        DCTKind((2, 2, 3, 3), coef_group=[0, 2] + [0] * 7)  # group 1 is missing
    with pytest.raises(EPRFormatError, match="unknown kind"):
        decoder_for_entry({"name": "w", "kind": "zip", "shape": [3]})
    kind = DCTKind((2, 3, 3, 3), coef_group=[0, 1, 1, 1, 1, 2, 1, 2, 2])
    assert kind.num_groups == 3 and kind.num_params == 3 and sum(kind.group_sizes()) == 54
    q = np.arange(54, dtype=np.int32).reshape(2, 3, 3, 3)
    assert np.array_equal(kind.join(kind.split(q)), q.astype(np.float32))


@pytest.mark.parametrize("kind", [AffineKind((40, 30)), DCTKind((16, 8, 3, 3), [0, 1, 1, 1, 2, 2, 2, 2, 2])])
def test_decoding_a_files_groups_reuses_their_memory(kind):
    """Groups back to back in one int32 buffer (as decoded from a file) become the weights in that memory, with the
    values of decode(); groups elsewhere are decoded into new memory, with the same values."""
    q = np.random.default_rng(0).integers(-20, 20, size=kind.shape).astype(np.int32)
    groups = kind.split(q)
    buffer = np.concatenate(groups).astype(np.int32)
    ends = np.cumsum([0] + [g.size for g in groups])
    params = torch.tensor([-4.0, 0.01] if kind.name == "affine" else [-4.0, -4.5, -5.0])
    expected = kind.decode(torch.from_numpy(kind.join(groups)), params)
    weights = kind.decode_groups([buffer[a:b] for a, b in zip(ends[:-1], ends[1:])], params)
    assert torch.equal(weights, expected) and weights.data_ptr() == buffer.ctypes.data
    if kind.name == "dct":
        apart = [g.copy() for g in groups]
        assert torch.equal(kind.decode_groups(apart, params), expected)


@pytest.mark.parametrize("loops", ["torch", "torch, accelerator sums", "compiled"])
@pytest.mark.parametrize("kinds", ["dct only", "affine and dct"])
def test_quantizing_tensors_together_equals_one_by_one(kinds, loops, monkeypatch):
    """quantize_together (the forward's batched rounding) gives each tensor's own fused rounding, values and
    gradients, whether or not some kinds have shifts, in torch operations (with the step sizes' gradients summed by
    a bincount, or as on accelerators by an index_add_, which needs no host synchronization) and in the compiled
    loops."""
    if loops == "compiled" and decoders._native_train is None:
        pytest.skip("the compiled training loops are not in use (not built, or HF_EPR_NATIVE=0)")
    if loops != "compiled":
        monkeypatch.setattr(decoders, "_native_train", None)
    monkeypatch.setattr(decoders, "accelerator_path", lambda device: loops == "torch, accelerator sums")
    torch.manual_seed(0)
    specs = [DCTKind((6, 4, 3, 3), [0, 1, 1, 1, 2, 2, 2, 2, 2]), DCTKind((5, 5, 3, 3), [0, 0, 0, 0, 1, 1, 1, 1, 1])]
    if kinds == "affine and dct":
        specs = [AffineKind((30,)), AffineKind((7, 9))] + specs
    zs = [(torch.randn(k.shape) * 0.1).requires_grad_() for k in specs]
    # the decoders' parameters back to back, after 3 of a tensor decoded on its own (no gradient from here)
    params = [torch.tensor([0.5, -1.0, 2.0])] + [k.initial_params(z.detach(), 1 / 16) for k, z in zip(specs, zs)]
    pool = torch.cat(params).requires_grad_()
    steps, shifts, patterns, start, slices = [], [], [], 3, []
    for k in specs:
        group = k.group_index()
        steps.append(group + start)
        if k.has_shift:
            shifts.append(group + start + k.num_groups)
        patterns.append(k.compiled_steps(start))
        slices.append(slice(start, start + k.num_params))
        start += k.num_params
    no_shift = torch.zeros(0, dtype=torch.long)
    flat = quantize_together(zs, pool, torch.cat(steps), torch.cat(shifts) if shifts else no_shift, patterns)
    weights = torch.linspace(-1, 1, flat.numel())
    (flat * weights).sum().backward()
    together = [t.grad.clone() for t in zs + [pool]]
    assert torch.equal(pool.grad[:3], torch.zeros(3))
    for t in zs + [pool]:
        t.grad = None
    one_by_one = torch.cat([_QuantizeSTE.apply(z, pool[where], k).reshape(-1) for k, z, where in zip(specs, zs, slices)])
    (one_by_one * weights).sum().backward()
    assert torch.equal(flat.detach(), one_by_one.detach())
    assert all(torch.allclose(a, t.grad, rtol=1e-5, atol=1e-7) for a, t in zip(together, zs + [pool]))
