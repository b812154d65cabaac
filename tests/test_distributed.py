"""Distributed training on 2 CPU processes (gloo): DDP under `accelerate launch` (identical latents and
coefficients, global logged bits, no stride warning, a loadable repo) and FSDP2 (`fully_shard` of the whole
EPRModel: identical latents on both ranks, and the repo equals a one-process save of the same latents).

Note: in accelerate 1.15 `accelerate launch --cpu --num_processes 2 script.py` starts ONE process unless an MPI
hostfile is given (``--mpirun_hostfile``); recipes/accelerate_cpu.yaml uses accelerate's torchrun launcher with
``use_cpu`` in the script's arguments instead, which gives 2 gloo processes with nothing beyond torch.
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from hf_epr import EPRCompressedForImageClassification, EPRModel
from hf_epr.format import WEIGHTS_NAME
from hf_epr.trainer import TRAINING_STATE

HERE = Path(__file__).parent


def _failure(proc: subprocess.CompletedProcess, out: Path) -> str:
    """What a failed launch left: the files the ranks wrote (how far they got) and the ends of both streams."""
    return f"written: {sorted(p.name for p in out.iterdir())}\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"


@pytest.mark.slow
def test_two_process_cpu_training(tmp_path):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(HERE.parent / "recipes" / "accelerate_cpu.yaml"), "--main_process_port", "29533",
           str(HERE / "accelerate_script.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, _failure(proc, tmp_path)
    assert "Grad strides do not match" not in proc.stderr  # no parameter with a stride-0 dimension
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["digest"] == ranks[1]["digest"]  # DDP kept the latents identical
    assert ranks[0]["policy"] == ranks[1]["policy"]  # SoftAdapt averages its inputs over the processes
    assert len({json.dumps(r["policy"]["weights"]) for r in ranks}) == 1 and ranks[0]["policy"]["previous"]
    assert ranks[0]["logs"] == ranks[1]["logs"]  # logged values are global means, not per-rank
    last = ranks[0]["logs"][-1]
    assert last["step"] == 8

    # a single process recomputes the bits from the saved training state (the full wrapper state at step 8)
    again = EPRModel.from_pretrained(tmp_path / "repo")
    latents = again.integer_latents()
    digest = hashlib.sha256(b"".join(latents[k].numpy().tobytes() for k in sorted(latents))).hexdigest()
    assert digest == ranks[0]["digest"]
    again.load_state_dict(load_file(tmp_path / "checkpoint-8" / TRAINING_STATE))
    assert again.exact_bits() == pytest.approx(last["bits"], rel=1e-5)
    assert EPRCompressedForImageClassification.from_pretrained(tmp_path / "repo") is not None


@pytest.mark.slow
def test_fsdp2_two_processes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29534",
           str(HERE / "fsdp2_script.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, _failure(proc, tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["parameter_type"] == "DTensor"  # the parameters really were sharded
    assert ranks[0]["digest"] == ranks[1]["digest"] and ranks[0]["exact_bits"] == ranks[1]["exact_bits"]
    again = EPRModel.from_pretrained(tmp_path / "repo")
    latents = again.integer_latents()
    assert hashlib.sha256(b"".join(latents[k].numpy().tobytes() for k in sorted(latents))).hexdigest() == \
        ranks[0]["digest"]
    again.save_pretrained(tmp_path / "one-process")
    assert (tmp_path / "one-process" / WEIGHTS_NAME).read_bytes() == (tmp_path / "repo" / WEIGHTS_NAME).read_bytes()
