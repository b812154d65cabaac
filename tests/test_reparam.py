"""Attaching decoders: which tensors are compressed, tied parameters stored once, small tensors decoded together."""

import pytest
import torch

from hf_epr import EPRConfig, EPRModel
from hf_epr.testing import tiny_inputs, tiny_model


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


@pytest.mark.parametrize("family", ["resnet", "convnext", "vit"])
def test_small_tensors_decoded_together_equal_one_by_one(family):
    """The forward's batched decode (one quantization for the small tensors, one product per kind of transform)
    gives the weights of each tensor's own decoder, and the same gradients."""
    model = EPRModel.from_base(tiny_model(family), EPRConfig(init_step_ratio=0.05)).train()
    assert len(model.decode_batch.weights()) > 1
    x = tiny_inputs(family)
    batch = model.decode_batch.candidates
    results = []
    for together in (True, False):
        model.decode_batch.candidates = batch if together else []
        model.zero_grad(set_to_none=True)
        logits = model(pixel_values=x).logits
        (logits * torch.linspace(-1, 1, logits.numel()).view(logits.shape)).sum().backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (a, grads_a), (b, grads_b) = results
    assert torch.equal(a, b)
    assert len(grads_a) == len(grads_b) and all(torch.allclose(g, h, rtol=1e-4, atol=1e-7)
                                                for g, h in zip(grads_a, grads_b))
