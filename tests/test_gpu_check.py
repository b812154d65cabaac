"""benchmarks/gpu_check.py, the GPU run's one command, runs its whole flow on the CPU at small sizes (CI has no GPU:
this keeps the script that proves the GPU paths working between the runs that have one)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def gpu_check(out: Path, *args: str, result: str = "gpu_check.json", timeout: int = 600) -> dict:
    """Run ``benchmarks/gpu_check.py --small *args`` with CUDA hidden, writing to ``out``; its ``result`` file, read."""
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--small", *args, "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / result).read_text())


def test_gpu_check_runs_its_whole_flow_at_small_sizes(tmp_path):
    result = gpu_check(tmp_path, "--models", "convnext-t", "--steps", "1", "--warmup", "1", "--no-auto")
    runs = {row["run"]: row for row in result["steps"]}
    assert set(runs) == {"plain fp32", "off fp32", "plain bf16", "off bf16"}  # bf16: the CPU's autocast here
    assert all(row["ms_per_step"] > 0 and "error" not in row for row in runs.values()), runs
    assert runs["off fp32"]["grids_built"] >= 1
    (check,) = result["checks"]
    assert check["eval_bytes_equal_file"] and check["cpu_latents_equal_gpu"] and check["eval_coded_bytes"] > 0
    assert check["bf16_load_dtype"] == "torch.bfloat16" and check["device_map_max_logit_diff"] < 1e-4
    assert check["plain_load_s"] > 0 and check["fp32_load_s"] > 0 and check["wrapper_load_s"] > 0
    assert check["plain_load_stages_s"].startswith("config ") and "transformers" in check["plain_load_stages_s"]
    assert result["fsdp2"]["reloaded_latents_equal"] is True


@pytest.mark.slow
def test_gpu_check_times_the_steps_compiled_too(tmp_path):
    """``--compile``: the plain and EPR steps with ``torch_compile=True`` (TorchInductor), on a model whose small
    tensors are decoded together."""
    result = gpu_check(tmp_path, "--models", "resnet50", "--steps", "1", "--warmup", "1", "--no-auto", "--compile",
                       "--check-models", "--no-load-times", timeout=900)
    runs = {row["run"]: row for row in result["steps"]}
    compiled = {"plain fp32 compiled", "off fp32 compiled", "plain bf16 compiled", "off bf16 compiled"}
    assert compiled <= set(runs)
    assert all(runs[r]["ms_per_step"] > 0 and "error" not in runs[r] for r in compiled), runs
    assert runs["off fp32 compiled"]["ratio_vs_plain_compiled"] > 0


def test_gpu_check_profile_compares_the_steps_operation_by_operation(tmp_path):
    result = gpu_check(tmp_path, "--profile", "--models", "resnet50", "--steps", "1",
                       result="gpu_check_profile.json")
    parts = {(row["precision"], row["part"]) for row in result["rows"]}
    assert {("fp32", "plain step"), ("fp32", "EPR step"), ("bf16", "rate fwd+bwd"),
            ("bf16", "EPR step, CPU's path (host syncs)")} <= parts
    assert all(row["wall_ms"] > 0 and row["syncs"] == 0 for row in result["rows"])  # no sync counted off CUDA
    for label in ("fp32", "bf16"):
        rows = result["epr_less_plain"]["resnet50"][label]
        total = rows[-1]
        assert total["operation"] == "all operations" and total["epr_calls"] > total["plain_calls"]
        assert any(r["operation"] == "_QuantizeTogether" and r["plain_calls"] == 0 for r in rows), rows
    assert "EPR step less plain step" in (tmp_path / "gpu_check_profile.md").read_text()
