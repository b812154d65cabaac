"""A copy of the repository in an empty folder (no ../shared beside it, as a user's clone) has its data."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_copy_in_empty_folder_loads_its_own_data(tmp_path):
    copy = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "outputs", ".git")
    for part in ("hf_epr", "recipes", "tests"):
        shutil.copytree(ROOT / part, copy / part, ignore=ignore)
    code = (
        "import sys, hf_epr\n"
        f"assert hf_epr.__file__.startswith({str(copy)!r}), hf_epr.__file__\n"
        "sys.path.insert(0, 'recipes')\n"
        "import compress\n"
        "train, test = compress.load_splits(compress.DataArguments())\n"
        "assert (len(train), len(test)) == (5000, 10000), (len(train), len(test))\n"
        "assert test.features['label'].names == [str(i) for i in range(10)]\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_EPR_MNIST_DIR"}
    env["PYTHONPATH"] = str(copy)
    proc = subprocess.run([sys.executable, "-c", code], cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the suite's own data tests, run from the copy
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_data.py",
                           "-k", "split or dataset"], cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and " passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]
