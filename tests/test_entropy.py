"""The learned density and the rate: exact bits of the rounded latents, the noise relaxation, and their gradients."""

import copy

import pytest
import torch
from transformers import AutoModelForImageClassification, ResNetConfig

from hf_epr import EPRConfig, EPRError, EPRModel, entropy
from hf_epr.entropy import FactorizedDensity, LatentTensor, cell_bits, grid_rate, latent_histogram, noise_rate
from hf_epr.format import decoders
from hf_epr.format.decoders import AffineKind, DCTKind
from hf_epr.testing import tiny_inputs, tiny_model, working_operations


def brute_force_bits(model: EPRModel) -> float:
    """-sum log2 P(round(u)) with one density call per latent (what the histogram must equal)."""
    total, channel = 0.0, 0
    for t in model.latent_tensors():
        u = t.kind.units(t.z.detach(), t.params.detach())
        groups = t.kind.group_index().view(u.shape)
        for g in range(t.kind.num_groups):
            values = torch.round(u[groups == g]).view(1, -1)
            index = torch.full((1,), channel + g, dtype=torch.long)
            total += float(model.density.neg_log2_pmf(values, index).sum().detach())
        channel += t.kind.num_groups
    return total


@pytest.mark.parametrize("family", ["convnext", "resnet"])
def test_exact_bits_equal_one_density_call_per_latent(family):
    model = EPRModel.from_base(tiny_model(family), EPRConfig(init_step_ratio=0.05))
    model.fit_density(50)
    exact = grid_rate(model.density, model.latent_tensors())
    assert float(exact.detach()) == pytest.approx(brute_force_bits(model), rel=1e-4)
    assert model.exact_bits() == pytest.approx(float(exact.detach()), rel=1e-6)
    # after fitting, the estimate is close to the real coded latents (the file's histogram tables)
    c = model.to_container()
    assert 0.9 < model.exact_bits() / sum(g.entropy_bits(c.precision) for g in c.groups) < 1.25


def test_noise_relaxation_tracks_exact_bits_and_reaches_every_parameter():
    model = EPRModel.from_base(tiny_model("resnet"), EPRConfig(init_step_ratio=0.1))
    model.fit_density(200)
    noisy = grid_rate(model.density, model.latent_tensors(), resolution=4, smooth=True)
    noisy.backward()
    assert 0.8 < float(noisy.detach()) / model.exact_bits() < 1.3
    groups = model.parameter_groups()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["latents"] + groups["decoders"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["density"])


def toy_latents(scale: float, kind: str):
    """A density, a decoder kind, latents and decoder parameters for one affine or DCT tensor (seeded)."""
    torch.manual_seed(0)
    density = FactorizedDensity(1 if kind == "affine" else 2, init_scales=torch.full((2,), scale)[:1 + (kind == "dct")])
    shape = (3000,) if kind == "affine" else (60, 10, 3, 3)
    spec = AffineKind(shape) if kind == "affine" else DCTKind(shape, coef_group=[0, 1, 1, 1, 1, 1, 1, 1, 1])
    z = (torch.randn(shape) * scale / 3 * 0.01 + 0.002).requires_grad_()
    params = torch.tensor([-4.6052, 0.002] if kind == "affine" else [-4.6052, -4.0]).requires_grad_()
    return density, spec, z, params


@pytest.mark.parametrize("scale,kind", [(3.0, "affine"), (900.0, "affine"), (3.0, "dct")])  # unit bins, wide bins
def test_relaxed_rate_and_gradients_match_the_expectation_over_noise(scale, kind):
    """Value and gradients (latents, log step, shift) against a Monte-Carlo expectation of -log2 p(u + noise)
    computed with one density call per sample."""
    density, spec, z, params = toy_latents(scale, kind)
    shape = z.shape
    fast = grid_rate(density, [LatentTensor(z, spec, params)], resolution=4, smooth=True)
    fast.backward()
    fast_grads = (z.grad.clone(), params.grad.clone())
    z.grad, params.grad = None, None
    samples, total = 64, 0.0
    groups = spec.group_index().view(shape)
    for i in range(samples):
        u = spec.units(z, params) + torch.rand(shape, generator=torch.Generator().manual_seed(i)) - 0.5
        for g in range(spec.num_groups):
            total = total + density.neg_log2_pmf(u[groups == g].view(1, -1), torch.tensor([g])).sum() / samples
    total.backward()
    assert float(fast.detach()) == pytest.approx(float(total.detach()), rel=5e-3)
    assert torch.corrcoef(torch.stack([fast_grads[0].reshape(-1), z.grad.reshape(-1)]))[0, 1] > 0.97
    assert torch.allclose(fast_grads[1], params.grad, rtol=0.05, atol=0.05 * float(params.grad.abs().max()))


@pytest.mark.parametrize("sums", ["all latents", "strided subset"])
@pytest.mark.parametrize("scale,kind", [(3.0, "affine"), (900.0, "affine"), (3.0, "dct")])
def test_sampled_noise_rate_averages_to_the_expected_rate(scale, kind, sums, monkeypatch):
    """The training rate (one noise draw per latent) averaged over draws: the deterministic expectation's value
    and gradients (latents, log step, shift); also when its sums come from a strided subset of the latents."""
    if sums == "strided subset":
        monkeypatch.setattr(entropy, "SAMPLED_LATENTS", 700)
        monkeypatch.setattr(entropy, "SAMPLE_BLOCK", 8)
    density, spec, z, params = toy_latents(scale, kind)
    tensors = [LatentTensor(z, spec, params)]
    expected = grid_rate(density, tensors, resolution=4, smooth=True)
    expected.backward()
    expected_grads = (z.grad.clone(), params.grad.clone())
    z.grad, params.grad = None, None
    draws = 64
    mean = sum(noise_rate(density, tensors) for _ in range(draws)) / draws
    mean.backward()
    assert float(mean.detach()) == pytest.approx(float(expected.detach()), rel=1e-2)
    assert torch.corrcoef(torch.stack([expected_grads[0].reshape(-1), z.grad.reshape(-1)]))[0, 1] > 0.9
    assert torch.allclose(expected_grads[1], params.grad, rtol=0.05, atol=0.05 * float(params.grad.abs().max()))


def test_histogram_places_every_latent_in_its_channel():
    model = EPRModel.from_base(tiny_model("convnext"), EPRConfig(init_step_ratio=0.05))
    hist = latent_histogram(model.latent_tensors(), resolution=4)
    assert int(hist.counts.sum()) == model.num_compressed_parameters
    per_channel = hist.counts.sum(1).tolist()
    expected = [n for t in model.latent_tensors() for n in t.kind.group_sizes()]
    assert per_channel == expected
    r = hist.resolution
    assert (hist.counts[:, :r] == 0).all() and (hist.counts[:, -r:] == 0).all()  # the spare bins stay empty
    assert cell_bits(model.density, hist, smooth=True).shape == hist.counts.shape


def test_training_rate_keeps_its_grid_and_buffers_without_changing_the_rate():
    """A workspace reused across steps (grid kept while the latents fit, built again when they leave it) gives the
    rate and gradients of a fresh workspace on the same noise; two graphs pending at once keep their own cells."""
    density, spec, z, params = toy_latents(3.0, "affine")
    tensors = [LatentTensor(z, spec, params)]

    def rate_and_grads(workspace, seed):
        z.grad = params.grad = None
        torch.manual_seed(seed)
        r = entropy.noise_rate(density, tensors, workspace=workspace)
        r.backward()
        return float(r.detach()), z.grad.clone(), params.grad.clone()

    kept = entropy.RateWorkspace()
    rate_and_grads(kept, 0)
    for moved in (1.0, 1.2, 4.0):  # inside the kept grid, then beyond it
        with torch.no_grad():
            z.mul_(moved)
        built, builds = kept.grid, kept.builds
        a, b = rate_and_grads(kept, 1), rate_and_grads(entropy.RateWorkspace(), 1)
        assert (kept.grid is built) == (moved != 4.0) and kept.builds == builds + (moved == 4.0)  # counted
        assert a[0] == pytest.approx(b[0], rel=1e-5)
        assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-6) for x, y in zip(a[1:], b[1:]))
    z.grad = params.grad = None
    torch.manual_seed(2)
    first = entropy.noise_rate(density, tensors, workspace=kept)
    second = entropy.noise_rate(density, tensors, workspace=kept)  # before the first one's backward
    (first + second).backward()
    together = z.grad.clone()
    one = rate_and_grads(kept, 2)[1]
    torch.manual_seed(2)
    entropy.noise_rate(density, tensors, workspace=kept)  # draws what the first call drew
    z.grad = None
    entropy.noise_rate(density, tensors, workspace=kept).backward()
    assert torch.allclose(together, one + z.grad, rtol=1e-4, atol=1e-6)


def test_training_rate_grid_survives_a_checkpoint():
    model = EPRModel.from_base(tiny_model("resnet"), EPRConfig(init_step_ratio=0.05)).train()
    model.bits()
    state = model.rate_workspace.state_dict()
    again = entropy.RateWorkspace()
    again.load_state_dict(state)
    assert again.state_dict() == state and state["points"] > 0


def test_small_tensors_placed_together_give_the_rate_of_tensors_placed_one_by_one(monkeypatch):
    """The training rate's layout (small tensors first, placed together with per-element gathers; the others one by
    one) gives the rate and gradients of placing every tensor on its own, for the same noise draw of each latent."""
    model = EPRModel.from_base(tiny_model("convnext"), EPRConfig(init_step_ratio=0.05)).train()
    tensors = model.latent_tensors()
    sizes = sorted(t.z.numel() for t in tensors)
    torch.manual_seed(0)
    noise = [torch.rand(t.z.shape) - 0.5 for t in tensors]

    class FixedNoise(entropy.RateWorkspace):
        def noise(self, n, dtype, device):
            out = torch.zeros(n, dtype=dtype)
            for part, draws in zip(self.layout(tensors).parts, noise):
                out[part] = draws.reshape(-1)
            return out

    results = []
    for small in (sizes[len(sizes) // 2], 0):  # half the tensors together, then none
        monkeypatch.setattr(decoders, "SMALL_TENSOR", small)
        workspace = FixedNoise()
        model.zero_grad(set_to_none=True)
        rate = noise_rate(model.density, tensors, workspace=workspace)
        rate.backward()
        assert bool(workspace.layout(tensors).small) == (small > 0)
        results.append((float(rate.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (a, grads_a), (b, grads_b) = results
    assert a == pytest.approx(b, rel=1e-6)
    assert len(grads_a) == len(grads_b) and all(torch.allclose(g, h, rtol=1e-4, atol=1e-6)
                                                for g, h in zip(grads_a, grads_b))


@pytest.mark.parametrize("family", ["convnext", "resnet"])
def test_training_rate_steers_the_decoders_parameters_held_as_one_tensor(family):
    """The model holds every decoder's parameters in one tensor; given it, the training rate sends the step sizes'
    and shifts' gradients to it in one piece, equal to what each tensor's own parameters get apart."""
    model = EPRModel.from_base(tiny_model(family), EPRConfig(init_step_ratio=0.05)).train()
    flat = model.decoder_parameters.flat
    apart = [t.params.detach().clone().requires_grad_() for t in model.latent_tensors()]
    tensors = [LatentTensor(t.z, t.kind, p) for t, p in zip(model.latent_tensors(), apart)]
    grads = []
    for params, given in ((apart, None), ([flat], flat)):
        torch.manual_seed(0)
        model.zero_grad(set_to_none=True)
        noise_rate(model.density, tensors, workspace=entropy.RateWorkspace(), params=given).backward()
        grads.append(torch.cat([p.grad for p in params]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], rtol=1e-5, atol=1e-7)
    with pytest.raises(EPRError, match="one flat tensor"):
        noise_rate(model.density, tensors, workspace=entropy.RateWorkspace(), params=flat[1:])


@pytest.mark.parametrize("sampled", [False, True])
def test_training_rate_on_the_accelerator_path_equals_the_cpu_path(sampled, monkeypatch):
    """On accelerators the training rate reads nothing back to the host (its grid built on the device with room for
    the widest channel, its per-cell sums index_add_s): forced here on the CPU, a fresh workspace's rate and
    gradients are those of the CPU's path (a grid sized on the host, bincount sums), for the same draws."""
    monkeypatch.setattr(decoders, "_native_train", None)
    if sampled:
        monkeypatch.setattr(entropy, "SAMPLED_LATENTS", 700)
        monkeypatch.setattr(entropy, "SAMPLE_BLOCK", 8)
    model = EPRModel.from_base(tiny_model("resnet"), EPRConfig(init_step_ratio=0.05)).train()
    results = []
    for on_device in (False, True):
        monkeypatch.setattr(decoders, "accelerator_path", lambda device: on_device)
        torch.manual_seed(0)
        model.zero_grad(set_to_none=True)
        rate = noise_rate(model.density, model.latent_tensors(), workspace=entropy.RateWorkspace())
        rate.backward()
        results.append((float(rate.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (a, grads_a), (b, grads_b) = results
    assert a == pytest.approx(b, rel=1e-6)
    assert len(grads_a) == len(grads_b) and all(torch.allclose(g, h, rtol=1e-4, atol=1e-6)
                                                for g, h in zip(grads_a, grads_b))


@pytest.mark.parametrize("family", ["convnext", "resnet"])
def test_channel_bounds_of_tensors_placed_together_equal_each_tensor_s_own(family, monkeypatch):
    """The training grid's per-channel bounds: the small tensors reduced together (scatter reductions), the large
    ones on their own, equal every tensor's own group bounds in channel order; a NaN latent shows in its channel."""
    model = EPRModel.from_base(tiny_model(family), EPRConfig(init_step_ratio=0.05))
    tensors = model.latent_tensors()
    sizes = sorted(t.z.numel() for t in tensors)
    monkeypatch.setattr(decoders, "SMALL_TENSOR", sizes[len(sizes) // 2])
    layout = entropy.RateLayout(tensors, batched=True)
    assert layout.small and layout.large
    expected = [t.kind.group_bounds(t.z.detach()) for t in tensors]
    lo, hi = layout.bounds(tensors)
    assert torch.equal(lo, torch.cat([b[0] for b in expected])) and torch.equal(hi, torch.cat([b[1] for b in expected]))
    with torch.no_grad():
        tensors[layout.small[0]].z.view(-1)[0] = float("nan")
    lo, hi = layout.bounds(tensors)
    channel = layout.channels[layout.small[0]].start + int(tensors[layout.small[0]].kind.group_index()[0])
    assert torch.isnan(lo[channel]) and torch.isnan(hi[channel]) and int(torch.isnan(lo).sum()) == 1


def half_placed_together(monkeypatch, model: EPRModel) -> EPRModel:
    """``model`` in training mode with the smaller half of its tensors decoded and placed together, the others one by
    one."""
    sizes = sorted(t.z.numel() for t in model.latent_tensors())
    monkeypatch.setattr(decoders, "SMALL_TENSOR", sizes[len(sizes) // 2])
    return model.train()


@pytest.mark.parametrize("family", ["resnet", "vit"])
def test_accelerator_path_trains_without_reading_the_device(family, monkeypatch, accelerator_path,
                                                           hf_epr_tensor_reads):
    """On the accelerator path a training step (batched rounding, forward, rate, backward) reads nothing back to
    the host but the previous step's finiteness flag, which by then the device has long computed; its grid is built
    at every step."""
    model = EPRModel.from_base(tiny_model(family), EPRConfig(rate_lambda=0.5, init_step_ratio=0.05))
    model = half_placed_together(monkeypatch, model)
    layout = entropy.RateLayout(model.latent_tensors(), batched=True)
    assert layout.small and layout.large  # both kinds of placement run
    x, labels = tiny_inputs(family, n=4), torch.arange(4) % 2
    hf_epr_tensor_reads.clear()  # (building the model reads its weights' spreads)
    for step in range(3):
        builds = model.rate_workspace.builds
        outputs, bits = model(pixel_values=x, labels=labels, return_bits=True)
        (outputs.loss + 0.5 * bits / model.num_compressed_parameters).backward()
        model.zero_grad(set_to_none=True)
        assert model.rate_workspace.builds == builds + 1
    assert [r.split(" > ")[-1] for r in hf_epr_tensor_reads] == ["entropy.py:read"] * 2  # flags of steps 1, 2


@pytest.mark.parametrize("family", ["resnet", "convnext"])
def test_rate_shares_the_small_latents_the_forward_concatenated(family, monkeypatch, accelerator_path):
    """In torch operations the forward concatenates the small tensors' latents to decode them; on accelerators the
    training rate inside that forward reads the same concatenation and sends its gradient there in one piece: the
    same rate and gradients as the rate computed on its own after the forward (for the same noise draw of each
    latent). The CPU's path keeps the tensors' order."""
    model = EPRModel.from_base(tiny_model(family), EPRConfig(rate_lambda=0.5, init_step_ratio=0.05))
    model = half_placed_together(monkeypatch, model)
    x, labels = tiny_inputs(family, n=4), torch.arange(4) % 2
    torch.manual_seed(0)
    draws = [torch.rand(t.z.shape) - 0.5 for t in model.latent_tensors()]

    class FixedNoise(entropy.RateWorkspace):  # each latent's draw whatever the order of the tensors
        def noise(self, n, dtype, device):
            out = torch.zeros(n, dtype=dtype)
            for part, d in zip(self._layout.parts, draws):
                out[part] = d.reshape(-1)
            return out

    read_shared = []
    small_values = entropy.RateLayout.small_values
    monkeypatch.setattr(entropy.RateLayout, "small_values", lambda self, tensors, small, out=None: (
        read_shared.append(small is not None and small.flat is not None), small_values(self, tensors, small, out))[1])
    results = []
    for shared in (True, False):
        read_shared.clear()
        model.rate_workspace = FixedNoise()
        model.zero_grad(set_to_none=True)
        if shared:
            outputs, bits = model(pixel_values=x, labels=labels, return_bits=True)
        else:
            outputs = model(pixel_values=x, labels=labels)
            bits = model.bits()
        (outputs.loss + 0.5 * bits / model.num_compressed_parameters).backward()
        grads = [(n, p.grad.clone()) for n, p in model.named_parameters() if p.grad is not None]
        results.append((float(bits.detach()), grads))
        assert read_shared == [shared] * 2  # the bounds and the placement read the forward's concatenation, or made one
        assert model.rate_workspace._layout.key[1] == model.decode_batch.order(model.device)  # in decoding order
    (a, grads_a), (b, grads_b) = results
    assert a == pytest.approx(b, rel=1e-6)
    assert [n for n, _ in grads_a] == [n for n, _ in grads_b]
    assert all(torch.allclose(g, h, rtol=1e-4, atol=1e-7) for (_, g), (_, h) in zip(grads_a, grads_b))
    monkeypatch.setattr(decoders, "accelerator_path", lambda device: False)  # the CPU's path: the tensors' order
    read_shared.clear()
    model(pixel_values=x, labels=labels, return_bits=True)
    assert model.rate_workspace._layout.key[1] == () and not any(read_shared)


def test_accelerator_path_step_costs_no_operations_per_compressed_tensor(accelerator_path):
    """On an accelerator every operation is a kernel launch or more: the operations an EPR training step (forward
    with its rate, backward) adds to the plain model's do not grow with the number of compressed tensors (the
    decoders' parameters are one tensor, the small tensors' latents concatenated once for decoding and rate)."""
    extra, tensors = [], []
    for depths in ([1, 1], [3, 3]):
        torch.manual_seed(0)
        config = ResNetConfig(num_labels=4, embedding_size=8, hidden_sizes=[8, 16], depths=depths)
        base = AutoModelForImageClassification.from_config(config).train()
        model = EPRModel.from_base(copy.deepcopy(base), EPRConfig(rate_lambda=0.5)).train()
        x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2,))

        def plain():
            base(pixel_values=x, labels=y).loss.backward()

        def epr():
            outputs, bits = model(pixel_values=x, labels=y, return_bits=True)
            (outputs.loss + bits / model.num_compressed_parameters).backward()

        for _ in range(3):  # the rate's first steps build its layout and buffers
            plain(), epr()
        extra.append(working_operations(epr) - working_operations(plain))
        tensors.append(len(model.entries))
    assert tensors[1] > tensors[0] + 4
    assert extra[1] - extra[0] <= tensors[1] - tensors[0], (extra, tensors)  # the code before: 3 per tensor


def test_accelerator_path_reports_divergence_a_step_late(monkeypatch, accelerator_path):
    model = half_placed_together(monkeypatch, EPRModel.from_base(tiny_model("resnet"), EPRConfig(init_step_ratio=0.05)))
    model.bits().backward()
    with torch.no_grad():
        model.latent_tensors()[3].z.view(-1)[5] = float("nan")
    late = model.bits()  # no error yet, and no out-of-range cell: the NaN latent goes to the grid's end
    late.backward()
    assert torch.isfinite(late)
    with pytest.raises(EPRError, match="diverged"):
        model.bits()
