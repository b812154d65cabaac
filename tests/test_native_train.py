"""The compiled training loops (hf_epr/_native_train.c) give what the torch operations give: the same quantized weights
bit for bit, the same cells for every latent, the same sums (float64 instead of float32 accumulation), and typed
errors for bad input. That they are built: tests/test_native.py."""

import copy

import numpy as np
import pytest
import torch

from hf_epr import EPRConfig, EPRModel, entropy
from hf_epr.format import decoders
from hf_epr.format.decoders import AffineKind, DCTKind, _quantize, host
from hf_epr.testing import tiny_inputs, tiny_model

native = decoders._native_train
needs_native = pytest.mark.skipif(native is None,
                                  reason="the compiled training loops are not in use (not built, or HF_EPR_NATIVE=0)")


@pytest.fixture
def torch_only(monkeypatch):
    """Rule the compiled loops out for the duration (what HF_EPR_NATIVE=0 does at import)."""
    def use(compiled: bool):
        monkeypatch.setattr(decoders, "_native_train", native if compiled else None)
    return use


@needs_native
@pytest.mark.parametrize("shift", [True, False])
def test_quantize_is_bit_identical_to_the_torch_operations(shift):
    g = torch.Generator().manual_seed(0)
    n_groups, period = 3, 9
    pattern = torch.randint(n_groups, (period,), generator=g, dtype=torch.int32)
    z = torch.randn(period * 500, generator=g) * torch.rand(period * 500, generator=g).pow(8) * 1e3
    z[:40] = torch.arange(40) * 0.5 - 10  # exact ties at the chosen steps: round half to even
    z[40:44] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0])
    z[44:46] = torch.tensor([3e38, -3e38])  # clamped to +-2**30 steps
    log_step = torch.tensor([0.0, -3.0, 2.5])
    params = torch.cat([log_step, torch.tensor([0.0, 0.25, -7.0])]) if shift else log_step
    x = torch.empty_like(z)
    native.quantize([(host(z), pattern.numpy(), n_groups if shift else -1)], host(params.exp()), host(params),
                    host(x, True), 1)
    index = pattern.long().repeat(500)
    expected = _quantize(z, log_step.exp()[index], params[n_groups:][index] if shift else None)
    assert torch.equal(x.view(torch.int32), expected.view(torch.int32))  # same bits, -0.0 and NaN included


@needs_native
def test_group_sums_split_among_threads_equal_the_bincount():
    g = torch.Generator().manual_seed(1)
    n = 9 * 233_100  # more than two threads' share (2**21)
    pattern = torch.randint(4, (9,), generator=g, dtype=torch.int32)
    z, grad = torch.randn(n, generator=g), torch.randn(n, generator=g)
    x = z + torch.rand(n, generator=g) - 0.5
    sums = {}
    for threads in (1, 2):
        out = torch.empty(4, dtype=torch.float64)
        native.group_sums([(host(z), pattern.numpy(), -1)], host(grad), host(x), host(out, True), threads)
        sums[threads] = out
    expected = torch.bincount(pattern.long().repeat(n // 9), (grad * (x - z)).double(), minlength=4)  # float32 products
    torch.testing.assert_close(sums[1], expected, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(sums[2], expected, rtol=1e-10, atol=1e-9)


@needs_native
def test_bad_input_is_a_typed_error():
    z, x, pattern = np.zeros(9, np.float32), np.zeros(9, np.float32), np.zeros(3, np.int32)
    params = np.zeros(2, np.float32)
    with pytest.raises(ValueError, match="pattern"):  # a step index past the parameters
        native.quantize([(z, np.full(3, 5, np.int32), -1)], params, params, x, 1)
    with pytest.raises(ValueError, match="repeat"):  # 9 values, a pattern of 4
        native.quantize([(z, np.zeros(4, np.int32), -1)], params, params, x, 1)
    with pytest.raises(TypeError, match="contiguous array"):  # float64 latents
        native.quantize([(z.astype(np.float64), pattern, -1)], params, params, x, 1)
    with pytest.raises(ValueError, match="x one per latent"):
        native.quantize([(z, pattern, -1)], params, params, x[:4], 1)
    with pytest.raises(ValueError, match="pick"):
        native.noisy_histogram([(z, pattern)], z, np.zeros(3, np.float32), np.zeros(9, np.int32),
                               np.zeros(30), 10, 1024, 2, 2, 1)
    with pytest.raises(ValueError, match="channels"):  # channel 0 only: a pattern naming channel 1
        native.noisy_histogram([(z, np.ones(3, np.int32))], z, np.zeros(3, np.float32), np.zeros(9, np.int32),
                               np.zeros(30), 10, 1024, 1, 0, 1)


@needs_native
def test_a_latent_off_the_grid_is_reported():
    z = np.array([0.0, 1.0, 50.0], np.float32)  # the last lands at 50 on a grid of 10 points
    index, sums = np.zeros(3, np.int32), np.zeros(30)
    coef = np.array([1.0, 2.0, 0.0], np.float32)  # a, b, c of one channel
    args = (np.zeros(3, np.float32), coef, index, sums, 10, 1024, 1, 0, 1)
    assert native.noisy_histogram([(z, np.zeros(1, np.int32))], *args) is False
    assert native.noisy_histogram([(z[:2], np.zeros(1, np.int32))], *args) is True
    assert index[:2].tolist() == [2, 3] and sums.reshape(-1, 3)[2:4, 0].tolist() == [1.0, 1.0]


def train_once(model, x, y, seed=1):
    model.rate_workspace = entropy.RateWorkspace()
    torch.manual_seed(seed)
    out, bits = model(pixel_values=x, labels=y, return_bits=True)
    (out.loss + bits / model.num_compressed_parameters).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    index = model.rate_workspace._buffers["index"][: model.num_compressed_parameters].clone()
    model.zero_grad(set_to_none=True)
    return out.logits.detach(), bits.detach(), grads, index


@needs_native
@pytest.mark.parametrize("family,sampled", [("resnet", None), ("vit", None), ("resnet", 512)])
def test_a_training_step_equals_the_torch_operations_step(family, sampled, torch_only, monkeypatch):
    if sampled:  # sums from every stride-th block of latents
        monkeypatch.setattr(entropy, "SAMPLED_LATENTS", sampled)
        monkeypatch.setattr(entropy, "SAMPLE_BLOCK", 64)
    torch.manual_seed(0)
    model = EPRModel.from_base(tiny_model(family), EPRConfig(rate_lambda=0.5)).train()
    kinds = {type(e.kind) for e in model.entries}
    assert kinds == {AffineKind, DCTKind} if family == "resnet" else AffineKind in kinds
    x, y = tiny_inputs(family, 4), torch.randint(0, 4, (4,))
    steps = {}
    for compiled in (False, True):
        torch_only(compiled)
        steps[compiled] = train_once(copy.deepcopy(model), x, y)
    (logits0, bits0, grads0, index0), (logits1, bits1, grads1, index1) = steps[False], steps[True]
    assert torch.equal(logits0, logits1)  # the same quantized weights
    assert torch.equal(index0, index1)  # every latent in the same cell
    torch.testing.assert_close(bits1, bits0, rtol=1e-6, atol=0)
    assert grads0.keys() == grads1.keys()
    for name in grads0:
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-4, atol=1e-4 * grads0[name].abs().max())


@needs_native
def test_the_compiled_loops_leave_the_parameters_storage_resizable():
    """FSDP2 frees an unsharded parameter by resizing its storage to nothing: reading a tensor through
    ``Tensor.numpy()`` would forbid that for good (the loops read through DLPack)."""
    torch.manual_seed(0)
    model = EPRModel.from_base(tiny_model("resnet"), EPRConfig(rate_lambda=0.5)).train()
    train_once(model, tiny_inputs("resnet", 4), torch.randint(0, 4, (4,)))
    for p in model.parameters():
        storage = p.untyped_storage()
        size = storage.nbytes()
        storage.resize_(0)  # raises "Trying to resize storage that is not resizable" otherwise
        storage.resize_(size)
