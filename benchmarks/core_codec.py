"""Codec benchmark: time and peak memory of from_pretrained (compressed vs fp32), and coded size vs the ideal
size under the stored tables, per architecture family.

    python benchmarks/core_codec.py            # full: ResNets of ~1 M, ~5 M, ResNet-50 (25 M), ViT-B/16 (86 M)
    python benchmarks/core_codec.py --quick    # smoke run (small models only)

Each load runs in a fresh subprocess (so peak RSS is that load's own), best of three rounds in which the
compressed, fp32 and wrapper loads take turns; ``uncompiled_load_s`` is the same plain load without hf_epr's
compiled decoder (``HF_EPR_NATIVE=0``: constriction and NumPy, as where no C compiler built it). Models are
randomly initialised and wrapped, for two kinds of file: "trained-like" with a coarse step
(``init_step_ratio=0.25``, about 4 bits per parameter, the entropy of a model after EPR training, entropy coded)
and "escape-heavy" with the default fine step (about 13 bits per parameter over ranges wider than a table, as right
after wrapping: bit-packed).
Writes ``benchmarks/results/core_codec.{md,json}``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import tempfile

import torch
from transformers import AutoModelForImageClassification, ResNetConfig, ViTConfig

from hf_epr.results import markdown_table

from common import best_of_interleaved, run_fresh, save_results

MODELS = {  # name -> config
    "resnet-1M": lambda: ResNetConfig(num_labels=10, layer_type="basic", embedding_size=32, hidden_sizes=[32, 64, 128, 256],
                                      depths=[1, 1, 1, 1]),
    "resnet-5M": lambda: ResNetConfig(num_labels=10, layer_type="basic", embedding_size=64,
                                      hidden_sizes=[64, 128, 256, 512], depths=[1, 1, 1, 1]),
    "resnet50-25M": lambda: ResNetConfig(num_labels=1000),
    "vit-b16-86M": lambda: ViTConfig(num_labels=1000),
}
FILES = {  # kind of file -> EPRConfig.init_step_ratio of a freshly wrapped model
    "trained-like": 0.25,  # about 4 bits per parameter, narrow tables: entropy coded
    "escape-heavy": 1 / 4096,  # the default wrapping step: ~13 bits per parameter, wide ranges (bit-packed)
}

LOAD = r"""
import json, sys, time
import torch
from transformers import AutoModelForImageClassification
kind, folder = sys.argv[1], sys.argv[2]
import hf_epr  # imported by both, so both pay the same start-up
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))
base_rss = status("VmRSS:")
if kind == "epr":
    from hf_epr.format import WEIGHTS_NAME, decode_latents, read_container
    t = time.perf_counter()
    meta, arrays = read_container(f"{folder}/{WEIGHTS_NAME}")
    n = sum(len(v) for v in decode_latents(meta, arrays))
    t_decode = time.perf_counter() - t
    del meta, arrays
    base_rss = status("VmRSS:")  # the timed load below starts from here
else:
    n, t_decode = 0, 0.0
t = time.perf_counter()
if kind == "wrapper":
    hf_epr.EPRModel.from_pretrained(folder)
else:
    AutoModelForImageClassification.from_pretrained(folder)
t_load = time.perf_counter() - t
rss = status("VmHWM:")
print(json.dumps({"load_s": t_load, "entropy_decode_s": t_decode, "symbols": n,
                  "peak_rss_mb": rss / 1024, "rss_over_imports_mb": (rss - base_rss) / 1024}))
"""


def load_once(kind: str, folder: str, compiled: bool = True) -> dict:
    """One load in a fresh interpreter (``compiled=False``: without hf_epr's compiled decoder)."""
    return run_fresh(LOAD, kind, folder, env={"HF_EPR_NATIVE": "1" if compiled else "0"})


def speed_rows(names: list[str], files: list[str], repeats: int) -> list[dict]:
    from hf_epr import EPRCompressedForImageClassification, EPRConfig, EPRModel
    from hf_epr.format import WEIGHTS_NAME, file_size_report

    rows = []
    for name in names:
        torch.manual_seed(0)
        base = AutoModelForImageClassification.from_config(MODELS[name]()).eval()
        n_params = sum(p.numel() for p in base.parameters())
        for file_kind in files:
            with tempfile.TemporaryDirectory() as tmp:
                epr_dir, fp32_dir = os.path.join(tmp, "epr"), os.path.join(tmp, "fp32")
                model = EPRModel.from_base(copy.deepcopy(base), EPRConfig(init_step_ratio=FILES[file_kind])).eval()
                model.save_pretrained(epr_dir)
                del model
                EPRCompressedForImageClassification.from_pretrained(epr_dir).save_pretrained(fp32_dir)
                gc.collect()
                os.sync()  # nothing left to write back while the loads are timed
                best = best_of_interleaved(load_once, {"epr": ("epr", epr_dir), "fp32": ("fp32", fp32_dir),
                                                       "wrapper": ("wrapper", epr_dir)}, repeats)
                epr, fp32, wrapper = best["epr"], best["fp32"], best["wrapper"]
                uncompiled = load_once("epr", epr_dir, compiled=False)
                report = file_size_report(epr_dir)
                fp32_bytes = os.path.getsize(os.path.join(fp32_dir, "model.safetensors"))
                rows.append({
                    "model": name, "file": file_kind, "params_M": n_params / 1e6, "fp32_MB": fp32_bytes / 1e6,
                    "epr_MB": os.path.getsize(os.path.join(epr_dir, WEIGHTS_NAME)) / 1e6,
                    "epr_file_over_ideal": report["file_over_ideal"],
                    "epr_load_s": epr["load_s"], "fp32_load_s": fp32["load_s"],
                    "load_ratio": epr["load_s"] / fp32["load_s"],
                    "uncompiled_load_s": uncompiled["load_s"],
                    "wrapper_load_s": wrapper["load_s"], "wrapper_over_plain": wrapper["load_s"] / epr["load_s"],
                    "decode_Msymbols_per_s": epr["symbols"] / 1e6 / epr["entropy_decode_s"],
                    "epr_rss_over_imports_MB": epr["rss_over_imports_mb"],
                    "fp32_rss_over_imports_MB": fp32["rss_over_imports_mb"],
                    "epr_peak_rss_over_fp32_size": epr["rss_over_imports_mb"] / (fp32_bytes / 2 ** 20),
                })
            print(f"  {name} {file_kind}: {rows[-1]['epr_load_s']:.3f} s vs fp32 {rows[-1]['fp32_load_s']:.3f} s",
                  flush=True)
    return rows


def ideal_rows(steps: int) -> list[dict]:
    """Coded words vs -sum log2 p under the stored tables, and whole file vs that ideal, per family."""
    from hf_epr import EPRConfig, EPRModel
    from hf_epr.format.container import encode_groups
    from hf_epr.testing import TINY_CONFIGS, tiny_inputs, tiny_model, train_a_few_steps

    rows = []
    for family in sorted(TINY_CONFIGS):
        model = EPRModel.from_base(tiny_model(family), EPRConfig(rate_lambda=0.5, init_step_ratio=0.05))
        train_a_few_steps(model, tiny_inputs(family), steps=steps, lam=0.5)
        c = model.to_container()
        coded = [g for g in c.groups if g.packing(c.precision) is None]
        ideal = sum(g.entropy_bits(c.precision) for g in coded) / 8
        words = encode_groups(coded, c.precision)[0].nbytes
        report = c.size_report()
        rows.append({"model": family, "groups": len(c.groups), "entropy_coded_groups": len(coded),
                     "ideal_bytes": round(ideal, 1), "coded_bytes": words, "coded_over_ideal": words / max(ideal, 1),
                     "file_bytes": report["total_bytes"], "file_over_ideal_with_raw": report["file_over_ideal"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small models, one repeat")
    args = parser.parse_args()
    names = ["resnet-1M"] if args.quick else list(MODELS)
    print(f"decode speed (fresh process per load, best of runs; {os.cpu_count()} CPUs):", flush=True)
    speed = speed_rows(names, list(FILES), repeats=1 if args.quick else 3)
    ideal = ideal_rows(steps=2 if args.quick else 10)
    text = ("## from_pretrained: compressed vs fp32 safetensors\n\n" + markdown_table(speed)
            + "\n\n## coded size vs ideal under the stored tables\n\n" + markdown_table(ideal) + "\n")
    save_results("core_codec", text, {"speed": speed, "rows": ideal}, quick=args.quick)


if __name__ == "__main__":
    main()
