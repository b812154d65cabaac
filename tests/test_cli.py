"""The hf-epr command."""

import subprocess
import sys

import torch
from transformers import AutoModelForImageClassification

from hf_epr import EPRConfig, EPRModel
from hf_epr.cli import main
from hf_epr.format import WEIGHTS_NAME
from hf_epr.testing import tiny_inputs, tiny_model


def test_inspect_totals_equal_file_sizes(tmp_path, capsys):
    model = EPRModel.from_base(tiny_model("convnext"), EPRConfig(init_step_ratio=0.05))
    model.save_pretrained(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    size = (tmp_path / WEIGHTS_NAME).stat().st_size
    assert f"{WEIGHTS_NAME}: {size} bytes" in out
    for f in tmp_path.iterdir():
        assert f"{f.name}: {f.stat().st_size} bytes" in out
    assert "dct" in out and "affine" in out and "raw" in out


def test_decode_gives_plain_checkpoint(tmp_path):
    model = EPRModel.from_base(tiny_model("vit"), EPRConfig(init_step_ratio=0.05)).eval()
    model.save_pretrained(tmp_path / "c")
    assert main(["decode", str(tmp_path / "c"), str(tmp_path / "plain")]) == 0
    assert (tmp_path / "plain" / "model.safetensors").is_file()
    plain = AutoModelForImageClassification.from_pretrained(tmp_path / "plain")
    x = tiny_inputs("vit")
    with torch.no_grad():
        assert (plain(pixel_values=x).logits - model(pixel_values=x).logits).abs().max() <= 1e-5


def test_errors_and_help(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hf_epr.cli", "inspect", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2 and "not an hf_epr compressed repo" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "hf_epr.cli", "decode", str(tmp_path), str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    for sub in ([], ["inspect"], ["decode"]):
        proc = subprocess.run([sys.executable, "-m", "hf_epr.cli", *sub, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage: hf-epr" in proc.stdout
