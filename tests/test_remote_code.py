"""What a repo carries: the decoder modules, and the source of an architecture that transformers lacks, so that
every repo (and its decoded checkpoint) loads where hf_epr is not installed."""

import json

import numpy as np
import torch

from hf_epr import EPRConfig, EPRModel
from hf_epr.cli import main as cli
from hf_epr.format import WEIGHTS_NAME
from hf_epr.models import LeNetConfig, LeNetForImageClassification
from hf_epr.modeling import DENSITY_NAME
from hf_epr.remote_code import BUNDLED_FILES


def test_lenet_repo_and_its_decoded_checkpoint_load_without_hf_epr(tmp_path, no_hf_epr_runner):
    torch.manual_seed(0)
    model = EPRModel.from_base(LeNetForImageClassification(LeNetConfig(variant="lenet5")),
                               EPRConfig(init_step_ratio=0.05)).eval()
    model.save_pretrained(tmp_path / "repo")
    assert sorted(p.name for p in (tmp_path / "repo").iterdir()) == sorted(
        ["config.json", WEIGHTS_NAME, DENSITY_NAME, "lenet.py", *BUNDLED_FILES])
    base = json.loads((tmp_path / "repo" / "config.json").read_text())["base_config"]
    assert base["auto_map"] == {"AutoConfig": "lenet.LeNetConfig",
                                "AutoModelForImageClassification": "lenet.LeNetForImageClassification"}
    assert cli(["decode", str(tmp_path / "repo"), str(tmp_path / "plain")]) == 0
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "x.npy", x.numpy())
    proc = no_hf_epr_runner(f"""
        import numpy as np, torch
        from transformers import AutoModelForImageClassification
        x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))
        for name in ("repo", "plain"):
            m = AutoModelForImageClassification.from_pretrained({str(tmp_path)!r} + "/" + name, trust_remote_code=True)
            assert type(m).__name__ == "LeNetForImageClassification", type(m)
            assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
            with torch.no_grad():
                np.save({str(tmp_path)!r} + f"/{{name}}.npy", m(pixel_values=x).logits.numpy())
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        expected = model(pixel_values=x).logits.numpy()
    for name in ("repo", "plain"):
        assert np.abs(np.load(tmp_path / f"{name}.npy") - expected).max() <= 1e-5
