"""Attaching decoders: which tensors are compressed, and tied parameters stored once."""

import torch

from hf_epr import EPRConfig, EPRModel
from hf_epr.testing import tiny_model


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
