"""The ``hf-epr`` command: inspect a compressed repo, or decode it into a plain transformers checkpoint."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from .format.container import WEIGHTS_NAME, file_size_report
from .format.errors import EPRError
from .format.configuration_epr import EPRCompressedConfig
from .format.modeling_epr import LOADERS, EPRCompressedForImageClassification
from .remote_code import write_base_code


def inspect(folder: str) -> dict:
    """Print the per-tensor table and totals of a compressed repo; returns the size report."""
    path = os.path.join(folder, WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise EPRError(f"{folder} has no {WEIGHTS_NAME}: it is not an hf_epr compressed repo")
    report = file_size_report(path)
    width = max([len(r["name"]) for r in report["tensors"]] + [6])
    print(f"{'tensor':<{width}}  {'decoder':<7} {'shape':<18} {'bits/param':>10} {'bytes':>10}")
    for r in report["tensors"]:
        print(f"{r['name']:<{width}}  {r['kind']:<7} {str(r['shape']):<18} {r['bits_per_param']:>10.3f} "
              f"{r['bytes']:>10.1f}")
    print(f"{'container header + metadata':<{width}}  {'':<7} {'':<18} {'':>10} {report['container_overhead_bytes']:>10.1f}")
    print(f"\n{WEIGHTS_NAME}: {report['total_bytes']} bytes; fp32: {report['fp32_bytes']} bytes; "
          f"ratio {report['ratio']:.1f}x")
    for name in sorted(os.listdir(folder)):
        full = os.path.join(folder, name)
        if os.path.isfile(full):
            print(f"  {name}: {os.path.getsize(full)} bytes")
    return report


def decode(folder: str, out: str) -> None:
    """Write the decoded model as a plain transformers checkpoint (model.safetensors + config.json)."""
    config = EPRCompressedConfig.from_pretrained(folder)
    main_class = (config.architectures or [""])[0]
    loader = next((c for c in LOADERS.values() if c.__name__ == main_class), EPRCompressedForImageClassification)
    model = loader.from_pretrained(folder, config=config)
    model.save_pretrained(out)
    config = json.loads(Path(out, "config.json").read_text())
    if write_base_code(out, model, config):  # an architecture outside transformers travels with its code
        Path(out, "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    processor = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(processor):
        shutil.copy(processor, os.path.join(out, "preprocessor_config.json"))
    print(f"decoded {type(model).__name__} written to {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-epr", description="Inspect or decode EPR-compressed model repos.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="per-tensor table: decoder, shape, bits/param, bytes; totals and ratio")
    p.add_argument("folder", help="a compressed repo folder (config.json + epr_weights.safetensors)")
    p = sub.add_parser("decode", help="write a plain transformers checkpoint of the decoded model")
    p.add_argument("folder", help="a compressed repo folder")
    p.add_argument("out", help="output folder for model.safetensors + config.json")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            inspect(args.folder)
        else:
            decode(args.folder, args.out)
    except (EPRError, OSError) as err:
        print(f"hf-epr: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
