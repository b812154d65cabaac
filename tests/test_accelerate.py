"""`accelerate launch --cpu --num_processes 2`: identical latents on both ranks, global bits, loadable repo."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hf_epr import EPRCompressedForImageClassification, EPRModel

HERE = Path(__file__).parent


@pytest.mark.slow
def test_two_process_cpu_training(tmp_path):
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    cmd = [launcher, "launch", "--config_file", str(HERE.parent / "recipes" / "accelerate_cpu.yaml"),
           "--main_process_port", "29533", str(HERE / "accelerate_script.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["digest"] == ranks[1]["digest"]
    assert ranks[0]["exact_bits"] == ranks[1]["exact_bits"]  # the rate is a function of replicated parameters
    assert ranks[0]["logged_bits"] and ranks[0]["logged_bits"][-1] == ranks[0]["exact_bits"]
    again = EPRModel.from_pretrained(tmp_path / "repo")
    latents = again.integer_latents()
    digest = hashlib.sha256(b"".join(latents[k].numpy().tobytes() for k in sorted(latents))).hexdigest()
    assert digest == ranks[0]["digest"]
    assert EPRCompressedForImageClassification.from_pretrained(tmp_path / "repo") is not None
