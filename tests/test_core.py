"""EPRModel end to end: wrap, train a few steps, save, load without hf_epr, and round-trip exactly."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from conftest import TINY_CONFIGS, tiny_inputs, tiny_model
from hf_epr import EPRCompressedForImageClassification, EPRConfig, EPRModel
from hf_epr.codec import file_size_report, ideal_bits
from hf_epr.loader import WEIGHTS_NAME

FAMILIES = sorted(TINY_CONFIGS)


def train_a_few_steps(model: EPRModel, x: torch.Tensor, steps: int = 5, lam: float = 0.05) -> None:
    model.train()
    groups = model.parameter_groups()
    opt = torch.optim.Adam([{"params": groups["latents"], "lr": 1e-3}, {"params": groups["decoders"], "lr": 1e-2},
                            {"params": groups["density"], "lr": 1e-2}, {"params": groups["raw"], "lr": 1e-3}])
    labels = torch.arange(len(x)) % 4
    for _ in range(steps):
        opt.zero_grad()
        loss = model(pixel_values=x, labels=labels).loss + lam * model.bits() / model.num_compressed_parameters
        loss.backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_wrap_reproduces_base(family):
    base = tiny_model(family)
    x = tiny_inputs(family, n=64)
    with torch.no_grad():
        ref = base(pixel_values=x).logits
        out = EPRModel.from_base(copy.deepcopy(base)).eval()(pixel_values=x).logits
    rel = (out - ref).abs().max() / ref.abs().max()
    assert rel <= 1e-3, f"{family}: relative logit error {rel:.2e}"
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.999


@pytest.mark.parametrize("family", FAMILIES)
def test_train_save_load_without_hf_epr(family, tmp_path, no_hf_epr_runner):
    model = EPRModel.from_base(tiny_model(family), EPRConfig(rate_lambda=0.05))
    x = tiny_inputs(family)
    train_a_few_steps(model, x)
    with torch.no_grad():
        expected = model(pixel_values=x).logits
    folder = tmp_path / "repo"
    model.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "epr_loader.py", WEIGHTS_NAME]
    np.save(tmp_path / "x.npy", x.numpy())
    proc = no_hf_epr_runner(f"""
        import numpy as np, torch
        from transformers import AutoModelForImageClassification
        m = AutoModelForImageClassification.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(m).__module__.startswith("transformers.models."), type(m)
        with torch.no_grad():
            out = m(pixel_values=torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))).logits
        np.save({str(tmp_path / 'out.npy')!r}, out.numpy())
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.from_numpy(np.load(tmp_path / "out.npy"))
    assert (got - expected).abs().max() <= 1e-5
    again = EPRModel.from_pretrained(folder)
    a, b = model.integer_latents(), again.integer_latents()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_from_pretrained_exact_and_resave_identical(tmp_path):
    model = EPRModel.from_base(tiny_model("resnet"), EPRConfig(rate_lambda=0.1))
    train_a_few_steps(model, tiny_inputs("resnet"), steps=3)
    model.save_pretrained(tmp_path / "a")
    again = EPRModel.from_pretrained(tmp_path / "a")
    again.save_pretrained(tmp_path / "b")
    assert (tmp_path / "a" / WEIGHTS_NAME).read_bytes() == (tmp_path / "b" / WEIGHTS_NAME).read_bytes()
    x = tiny_inputs("resnet")
    with torch.no_grad():
        assert torch.equal(model(pixel_values=x).logits, again(pixel_values=x).logits)


def test_coded_size_near_ideal_and_report_equals_file(tmp_path):
    model = EPRModel.from_base(tiny_model("convnext"), EPRConfig(rate_lambda=0.1))
    train_a_few_steps(model, tiny_inputs("convnext"), steps=3)
    c = model.to_container()
    words = c.to_bytes() and __import__("hf_epr.codec", fromlist=["encode_groups"]).encode_groups(c.groups, c.precision)[0]
    ideal = ideal_bits(c.groups, c.precision) / 8
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


def test_bits_differentiable_and_rate_gradient_shrinks_latents():
    model = EPRModel.from_base(tiny_model("resnet"), EPRConfig())
    bits = model.bits()
    assert bits.ndim == 0 and bits.requires_grad
    bits.backward()
    groups = model.parameter_groups()
    assert all(p.grad is not None for p in groups["latents"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["density"])
    # rate only: the estimate must fall when we follow its gradient
    opt = torch.optim.Adam(groups["latents"] + groups["decoders"] + groups["density"], lr=5e-2)
    start = float(model.bits().detach())
    for _ in range(30):
        opt.zero_grad()
        model.bits().backward()
        opt.step()
    assert float(model.bits().detach()) < 0.9 * start


def test_tied_parameters_are_stored_once(tmp_path):
    base = tiny_model("vit")
    head = base.classifier
    tied = torch.nn.Linear(head.in_features, head.out_features)
    tied.weight = head.weight  # share the classifier weight with an extra module
    base.extra_head = tied
    model = EPRModel.from_base(base, EPRConfig(raw_threshold=16))
    names = [t["name"] for t in model.to_container().tensors]
    assert "classifier.weight" in names and "extra_head.weight" not in names
    entry = next(e for e in model.entries if e.name == "classifier.weight")
    assert entry.aliases == ["extra_head.weight"]
    assert torch.equal(model.model.extra_head.weight, model.model.classifier.weight)


def test_plain_loader_in_process_matches(tmp_path):
    model = EPRModel.from_base(tiny_model("regnet"), EPRConfig(raw_dtype="float16"))
    model.eval().save_pretrained(tmp_path)
    plain = EPRCompressedForImageClassification.from_pretrained(tmp_path)
    reloaded = EPRModel.from_pretrained(tmp_path)  # raw tensors are float16 in the file: compare with the file
    x = tiny_inputs("regnet")
    with torch.no_grad():
        assert (plain(pixel_values=x).logits - reloaded(pixel_values=x).logits).abs().max() <= 1e-5
        assert (plain(pixel_values=x).logits - model(pixel_values=x).logits).abs().max() <= 1e-2
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model_type"] == "epr_compressed" and cfg["base_config"]["model_type"] == "regnet"
    assert set(cfg["auto_map"]) == {"AutoConfig", "AutoModelForImageClassification"}


def test_bad_arguments_raise_typed_errors():
    from hf_epr import EPRConfigError, EPRError

    with pytest.raises(EPRConfigError):
        EPRModel.from_base(torch.nn.Linear(3, 3))
    with pytest.raises(EPRConfigError):
        EPRModel.from_base(tiny_model("resnet"), {"rate_lambda": 1.0})
    for bad in (dict(rate_lambda=-1), dict(precision=20), dict(dct_grouping="zigzag"), dict(raw_dtype="int8")):
        with pytest.raises(EPRError):
            EPRConfig(**bad)


def test_rate_bounds_shortcut_matches_scatter_and_coded_size():
    from hf_epr.entropy import rate_bits

    model = EPRModel.from_base(tiny_model("convnext"), EPRConfig(init_step_ratio=0.05))
    model.fit_density(200)
    u, bounds = model._relaxed_latents()
    fast = rate_bits(model.density, u, model._latent_channel, bounds=bounds)
    slow = rate_bits(model.density, u, model._latent_channel)
    assert torch.allclose(fast, slow)
    # after fitting, the density's estimate is close to the real coded latents (histogram tables)
    c = model.to_container()
    assert 0.9 < float(fast) / ideal_bits(c.groups, c.precision) < 1.25


def test_noise_relaxation_tracks_exact_bits():
    from hf_epr.entropy import noise_bits, rate_bits

    model = EPRModel.from_base(tiny_model("resnet"), EPRConfig(init_step_ratio=0.1))
    model.fit_density(200)
    u, bounds = model._relaxed_latents()
    exact = float(rate_bits(model.density, u, model._latent_channel, bounds=bounds))
    torch.manual_seed(0)
    noisy = noise_bits(model.density, u, model._latent_channel, bounds=bounds)
    noisy.backward()
    assert 0.8 < float(noisy) / exact < 1.3
    assert all(p.grad is not None for p in model.parameter_groups()["latents"])


@pytest.mark.parametrize("scale,min_corr", [(3.0, 0.99), (900.0, 0.85)])  # unit bins (shared edges); wide bins
def test_noise_bits_interpolates_the_exact_noisy_bits(scale, min_corr):
    """The tabulated, interpolated rate equals -log2 P(cell) at the noisy values, and its gradient is the slope."""
    from hf_epr.entropy import FactorizedDensity, noise_bits

    torch.manual_seed(0)
    density = FactorizedDensity(1, init_scales=torch.tensor([scale]))
    u = (torch.randn(4000) * scale / 3).requires_grad_()
    channel = torch.zeros(4000, dtype=torch.long)
    torch.manual_seed(1)
    fast = noise_bits(density, u, channel)
    fast.backward()
    torch.manual_seed(1)
    v = u.detach().clone().requires_grad_()
    y = v + torch.empty_like(v).uniform_(-0.5, 0.5)  # the same noise draw as inside noise_bits
    exact = density.neg_log2_pmf(y.view(1, -1)).sum()
    exact.backward()
    assert float(fast.detach()) == pytest.approx(float(exact.detach()), rel=2e-3)
    assert torch.corrcoef(torch.stack([u.grad, v.grad]))[0, 1] > min_corr  # piecewise-linear vs exact slope


def test_fused_affine_decoder_matches_autograd_of_the_formula():
    from hf_epr.loader import affine_decode
    from hf_epr.reparam import AffineDecoder, ste_round

    torch.manual_seed(0)
    w = torch.randn(300, 200) * 0.05 + 0.01
    decoder = AffineDecoder(w, 1 / 64)
    grads = []
    for fused in (True, False):
        z = w.clone().requires_grad_()
        decoder.zero_grad()
        out = decoder(z) if fused else affine_decode(ste_round(decoder.relaxed(z)), decoder.log_step, decoder.shift)
        (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
        grads.append((out.detach(), z.grad, decoder.log_step.grad.clone(), decoder.shift.grad.clone()))
    (a, gz_a, gs_a, gh_a), (b, gz_b, gs_b, gh_b) = grads
    assert torch.equal(a, b)  # the same weights
    assert torch.allclose(gz_a, gz_b) and torch.allclose(gs_a, gs_b, rtol=1e-2, atol=1e-6)
    assert float(gh_a) == 0.0 and abs(float(gh_b)) < 1e-2  # zero in closed form; float noise through autograd


def test_dct_decode_is_the_two_sided_transform():
    from hf_epr.loader import dct_decode, dct_matrix

    q = torch.randint(-9, 10, (8, 4, 5, 5)).float()
    log_steps = torch.tensor([-3.0, -2.0, -1.5])
    groups = torch.tensor([0] * 5 + [1] * 10 + [2] * 10)
    steps = torch.exp(log_steps)[groups].view(5, 5)
    reference = dct_matrix(5).t() @ (steps * q) @ dct_matrix(5)
    assert torch.allclose(dct_decode(q, log_steps, groups), reference, atol=1e-5)
