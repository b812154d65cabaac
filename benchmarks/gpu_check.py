"""GPU check: the whole flow of a user with a GPU on ResNet-50, ViT-B/16 and ConvNeXt-T.

    python benchmarks/gpu_check.py            # CUDA: default configs, 1,000 labels, batch 64 of 224 x 224 images
    python benchmarks/gpu_check.py --small    # anywhere (also CPU): tiny configs, the same code paths
    python benchmarks/gpu_check.py --profile  # only where a step's time goes: gpu_check_profile.{md,json}
    python benchmarks/gpu_check.py --compile  # also the plain and EPR steps with torch_compile=True

Per model (random init, random images): the plain Trainer step against EPRTrainer steps (label preservation off and
auto; fp32 and bf16 mixed precision), the rate term alone, then on the device
``evaluate`` (real coded bytes) and ``save_model``; the saved repo loaded on the CPU (same integer latents), onto the
device with ``device_map``/``dtype``, and load times against the decoded fp32 safetensors checkpoint in fresh
processes (best of 3 interleaved rounds; then the plain load's steps timed one by one). Last, FSDP2 through
``accelerate launch`` (recipes/accelerate_fsdp2.yaml, one process). Writes ``benchmarks/results/gpu_check.{md,json}``
(``gpu_check_quick`` for --small), naming the device.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from transformers import (AutoModelForImageClassification, ConvNextConfig, ResNetConfig, Trainer, TrainerCallback,
                          TrainingArguments, ViTConfig)

from hf_epr import EPRCompressedForImageClassification, EPRConfig, EPRModel, EPRTrainer, EPRTrainingArguments
from hf_epr.data import TensorRows
from hf_epr.format import decoders
from hf_epr.results import markdown_table

from common import best_of_interleaved, run_fresh, save_results

ROOT = Path(__file__).resolve().parents[1]
MODELS = {  # name -> (full config, small config)
    "resnet50": (lambda: ResNetConfig(num_labels=1000),
                 lambda: ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)),
    "vit-b16": (lambda: ViTConfig(num_labels=1000),
                lambda: ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, num_labels=10)),
    "convnext-t": (lambda: ConvNextConfig(num_labels=1000),
                   lambda: ConvNextConfig(num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10)),
}
LOAD = r"""
import json, sys, time
import torch, transformers
from transformers import AutoModelForImageClassification
kind, folder = sys.argv[1], sys.argv[2]
import hf_epr  # imported by both, so both pay the same start-up
t = time.perf_counter()
if kind == "epr-wrapper":
    hf_epr.EPRModel.from_pretrained(folder)
elif kind == "epr-stages":  # the plain load's steps one by one, each timed
    from hf_epr.format import WEIGHTS_NAME, EPRCompressedConfig, decode_latents, decode_state_dict, read_container
    from hf_epr.format.modeling_epr import model_class_for
    marks = [t]
    base = EPRCompressedConfig.from_pretrained(folder).to_base_config(folder)
    target = model_class_for(base, "AutoModelForImageClassification", folder)
    marks.append(time.perf_counter())
    meta, arrays = read_container(f"{folder}/{WEIGHTS_NAME}")
    marks.append(time.perf_counter())
    latents = decode_latents(meta, arrays)
    marks.append(time.perf_counter())
    state = decode_state_dict(meta, arrays, latents)
    marks.append(time.perf_counter())
    target.from_pretrained(None, config=base, state_dict=state)
    marks.append(time.perf_counter())
    stages = ("config", "read+checksum", "decode", "decoders", "transformers")
    print(json.dumps({"load_s": marks[-1] - t, "stages": dict(zip(stages, (b - a for a, b in zip(marks, marks[1:]))))}))
    sys.exit()
else:
    AutoModelForImageClassification.from_pretrained(folder)
print(json.dumps({"load_s": time.perf_counter() - t}))
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer(TrainerCallback):
    """Wall time of the steps after ``warmup`` (device synchronized at both ends only), and for an EPR model the
    training rate's grids built during them (each such step pays the bounds and, usually, a second placement)."""

    def __init__(self, warmup: int):
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0
        self.builds: list[int | None] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.warmup:
            sync()
            self.start = time.perf_counter()
            self.builds.append(self._builds(model))
        elif state.global_step > self.warmup:
            self.steps += 1
            if state.global_step == args.max_steps:
                sync()
                self.end = time.perf_counter()
                self.builds.append(self._builds(model))

    @staticmethod
    def _builds(model) -> int | None:
        workspace = getattr(getattr(model, "module", model), "rate_workspace", None)
        return workspace.builds if workspace is not None else None

    @property
    def grid_builds(self) -> int | None:
        """Grids built during the timed steps (None for a model without a training rate)."""
        return self.builds[1] - self.builds[0] if len(self.builds) == 2 and None not in self.builds else None

    @property
    def ms_per_step(self) -> float:
        return 1000 * (self.end - self.start) / self.steps


def images(n: int, size: int, labels: int) -> TensorRows:
    g = torch.Generator().manual_seed(0)
    return TensorRows({"pixel_values": torch.randn(n, 3, size, size, generator=g),
                       "labels": torch.randint(0, labels, (n,), generator=g)})


def run_trainer(kind: str, base, data, batch: int, steps: int, warmup: int, bf16: bool, out: str,
                compiled: bool = False):
    """(trainer, ms per step) of one short run: kind is plain, off or auto; ``compiled``: ``torch_compile=True``
    (its compilation falls in the warm-up steps)."""
    common = dict(output_dir=out, max_steps=warmup + steps, per_device_train_batch_size=batch, learning_rate=1e-4,
                  report_to="none", save_strategy="no", logging_steps=10 ** 6, disable_tqdm=True, seed=0, bf16=bf16,
                  torch_compile=compiled,
                  dataloader_num_workers=2 if torch.cuda.is_available() else 0,
                  use_cpu=not torch.cuda.is_available())  # without CUDA, bf16 is the CPU's autocast
    timer = StepTimer(warmup)
    if kind == "plain":
        trainer = Trainer(model=copy.deepcopy(base), args=TrainingArguments(**common), train_dataset=data,
                          callbacks=[timer])
    else:
        model = EPRModel.from_base(copy.deepcopy(base), EPRConfig(rate_lambda=0.5))
        trainer = EPRTrainer(model=model, reference_model=copy.deepcopy(base) if kind == "auto" else None,
                             args=EPRTrainingArguments(label_preservation=kind, **common), train_dataset=data,
                             callbacks=[timer])
    trainer.train()
    return trainer, timer


def rate_term_ms(model: EPRModel, calls: int) -> float:
    model.train()
    times = []
    for _ in range(calls + 3):
        sync()
        t = time.perf_counter()
        (model.bits() / model.num_compressed_parameters).backward()
        sync()
        times.append(time.perf_counter() - t)
    model.zero_grad()
    return 1000 * sorted(times[3:])[len(times[3:]) // 2]


def digest(latents: dict) -> str:
    return hashlib.sha256(b"".join(latents[k].cpu().numpy().tobytes() for k in sorted(latents))).hexdigest()


def load_once(kind: str, folder: str) -> dict:
    """One load in a fresh process on the CPU: {"load_s": seconds} (and "stages" for ``epr-stages``)."""
    return run_fresh(LOAD, kind, folder, env={"CUDA_VISIBLE_DEVICES": ""})


def check_model(name: str, args, device: str, scratch: str) -> tuple[list[dict], dict]:
    """Step-time rows and one row of end-to-end checks for one model."""
    full, small = MODELS[name]
    size, batch = (32, 8) if args.small else (224, 64)
    torch.manual_seed(0)
    base = AutoModelForImageClassification.from_config((small if args.small else full)()).eval()
    labels = base.config.num_labels
    data = images(batch * (args.steps + args.warmup), size, labels)
    rows, kept = [], None
    plain = {}
    runs = [(kind, False) for kind in ("plain", "off", "auto") if not (args.no_auto and kind == "auto")]
    runs += [(kind, True) for kind in ("plain", "off") if args.compile]
    variants = [(kind, bf16, compiled) for bf16 in (False, True) for kind, compiled in runs]
    for kind, bf16, compiled in variants:
        label = f"{kind} {'bf16' if bf16 else 'fp32'}{' compiled' if compiled else ''}"
        try:
            trainer, timer = run_trainer(kind, base, data, batch, args.steps, args.warmup, bf16,
                                         os.path.join(scratch, f"{name}-{kind}-{bf16}-{compiled}"), compiled)
            ms = timer.ms_per_step
            if kind == "plain":
                plain[bf16, compiled] = ms
            row = {"model": name, "run": label, "ms_per_step": round(ms, 2),
                   "ratio_vs_plain": round(ms / plain[bf16, False], 3) if (bf16, False) in plain else None,
                   "grids_built": timer.grid_builds}
            if compiled and kind != "plain" and (bf16, True) in plain:
                row["ratio_vs_plain_compiled"] = round(ms / plain[bf16, True], 3)
            rows.append(row)
            if kind == "off" and not bf16 and not compiled:
                kept = trainer
            log(f"{name} {label}: {ms:.1f} ms/step")
        except Exception as err:  # noqa: BLE001 - report and go on with the other variants
            rows.append({"model": name, "run": label, "error": f"{type(err).__name__}: {str(err)[:300]}"})
            log(f"{name} {label} FAILED\n{traceback.format_exc()}")
    checks: dict = {"model": name}
    if args.check_models is not None and name not in args.check_models:
        return rows, checks
    try:
        epr = kept.accelerator.unwrap_model(kept.model)
        checks["latents_M"] = round(epr.num_compressed_parameters / 1e6, 2)
        checks["rate_term_ms"] = round(rate_term_ms(epr, 10 if args.small else 20), 2)
        checks["rate_G_latents_per_s"] = round(epr.num_compressed_parameters / checks["rate_term_ms"] / 1e6, 3)
        metrics = kept.evaluate(eval_dataset=images(2 * batch, size, labels))
        checks["eval_coded_bytes"] = metrics["eval_coded_bytes"]
        repo = os.path.join(scratch, f"{name}-repo")
        kept.save_model(repo)
        checks["saved_bytes"] = os.path.getsize(os.path.join(repo, "epr_weights.safetensors"))
        checks["eval_bytes_equal_file"] = checks["eval_coded_bytes"] == checks["saved_bytes"]
        on_device = digest(epr.integer_latents())
        on_cpu = EPRModel.from_pretrained(repo)  # loads on the CPU
        checks["cpu_latents_equal_gpu"] = digest(on_cpu.integer_latents()) == on_device
        x = images(4, size, labels).columns["pixel_values"]
        with torch.no_grad():
            epr.eval()
            expected = epr(pixel_values=x.to(device)).logits.float().cpu()
            plain_dev = EPRCompressedForImageClassification.from_pretrained(repo, device_map=device)
            got = plain_dev(pixel_values=x.to(device)).logits.float().cpu()
            checks["device_map_max_logit_diff"] = float((got - expected).abs().max())
            half = EPRCompressedForImageClassification.from_pretrained(repo, device_map=device, dtype=torch.bfloat16)
            checks["bf16_load_dtype"] = str(half.dtype)
        fp32 = os.path.join(scratch, f"{name}-fp32")
        EPRCompressedForImageClassification.from_pretrained(repo).save_pretrained(fp32)
        if not args.no_load_times:
            best = {name: run["load_s"] for name, run in best_of_interleaved(
                load_once, {"plain": ("epr", repo), "fp32": ("fp32", fp32), "wrapper": ("epr-wrapper", repo)},
                1 if args.small else 3).items()}
            checks["plain_load_s"], checks["fp32_load_s"] = round(best["plain"], 3), round(best["fp32"], 3)
            checks["load_ratio"] = round(best["plain"] / best["fp32"], 2)
            checks["wrapper_load_s"] = round(best["wrapper"], 3)
            checks["wrapper_over_plain"] = round(best["wrapper"] / best["plain"], 2)
            stages = load_once("epr-stages", repo)["stages"]
            checks["plain_load_stages_s"] = " / ".join(f"{k} {v:.3f}" for k, v in stages.items())
        log(f"{name} checks: {checks}")
    except Exception as err:  # noqa: BLE001
        checks["error"] = f"{type(err).__name__}: {str(err)[:300]}"
        log(f"{name} checks FAILED\n{traceback.format_exc()}")
    return rows, checks


def profile_model(name: str, args, device: str) -> tuple[list[dict], str, dict]:
    """Where one training step's time goes (manual loop, AdamW, lambda 0.5): wall time of the plain model's step,
    EPR's step, its rate term alone, and two variants of EPR's step: every tensor decoded and placed together (the
    accelerator's small-tensor limit raised), and the CPU's path (sums as bincounts, two host synchronizations each,
    and the rate's grid kept between steps and checked on the host: what accelerators ran before their own path);
    from the profiler, the kernels launched and the GPU's busy time per step, host-device synchronizations (sites
    named by file and line), the top operations of EPR's step and rate, and the operations whose time differs most
    between EPR's step and the plain one (device time on CUDA: where the extra work is)."""
    import warnings
    from torch.profiler import ProfilerActivity, profile

    full, small = MODELS[name]
    size, batch = (32, 8) if args.small else (224, 64)
    torch.manual_seed(0)
    base = AutoModelForImageClassification.from_config((small if args.small else full)())
    epr = EPRModel.from_base(copy.deepcopy(base), EPRConfig(rate_lambda=0.5)).to(device).train()
    x = torch.randn(batch, 3, size, size, device=device)
    # the same with every tensor decoded and placed together: the accelerator's small-tensor limit raised while its
    # first forward plans the batches, then restored
    limit, decoders.SMALL_TENSOR_ACCELERATOR = decoders.SMALL_TENSOR_ACCELERATOR, 1 << 40
    try:
        epr_batched = EPRModel.from_base(copy.deepcopy(base), EPRConfig(rate_lambda=0.5)).to(device).train()
        epr_batched(pixel_values=x[:2], return_bits=True)
    finally:
        decoders.SMALL_TENSOR_ACCELERATOR = limit
    base = base.to(device).train()
    y = torch.randint(0, base.config.num_labels, (batch,), device=device)
    n = epr.num_compressed_parameters
    rows, text, differences = [], "", {}
    for bf16 in (False, True):
        def training_step(model, rate: bool):
            """One AdamW step of ``model`` (its own optimizer, new for each precision); with ``rate``, an EPR
            model's loss plus 0.5 x bits per latent."""
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step():
                with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                    if rate:
                        out, bits = model(pixel_values=x, labels=y, return_bits=True)
                        loss = out.loss + 0.5 * bits / n
                    else:
                        loss = model(pixel_values=x, labels=y).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return step

        plain_step, epr_step = training_step(base, rate=False), training_step(epr, rate=True)
        batched_step = training_step(epr_batched, rate=True)

        def cpu_path_step():
            """The step on the CPU's path: bincount sums, the rate's grid kept and checked on the host."""
            saved, decoders.accelerator_path = decoders.accelerator_path, lambda device: False
            try:
                epr_step()
            finally:
                decoders.accelerator_path = saved

        def rate():
            (epr.bits() / n).backward()
            epr.zero_grad(set_to_none=True)

        label, per_op = "bf16" if bf16 else "fp32", {}
        for part, fn in (("plain step", plain_step), ("EPR step", epr_step), ("rate fwd+bwd", rate),
                         ("EPR step, all tensors batched", batched_step),
                         ("EPR step, CPU's path (host syncs)", cpu_path_step)):
            for _ in range(3):
                fn()
            sync()
            t = time.perf_counter()
            for _ in range(args.steps):
                fn()
            sync()
            ms = 1000 * (time.perf_counter() - t) / args.steps
            syncs = []
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    fn()
                torch.cuda.set_sync_debug_mode(0)
                for w in caught:
                    syncs.append(f"{Path(w.filename).name}:{w.lineno}")
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
            profiled = 2  # calls under the profiler
            with profile(activities=activities) as prof:
                for _ in range(profiled):
                    fn()
                sync()
            events = prof.key_averages()
            per_op[part] = op_times(events, device, profiled)
            # the device's work: kernels and copies (not the GPU-side spans of annotations such as the optimizer's
            # step, which cover its kernels and the gaps between them)
            kernels = [e for e in events
                       if e.device_type.name == "CUDA" and not getattr(e, "is_user_annotation", False)]
            gpu_ms = sum(e.self_device_time_total for e in kernels) / 1000 / profiled
            launches = sum(e.count for e in kernels) / profiled
            rows.append({"model": name, "precision": label, "part": part, "wall_ms": round(ms, 2),
                         "gpu_busy_ms": round(gpu_ms, 2), "kernels": int(launches), "syncs": len(syncs),
                         "sync_sites": " ".join(sorted(set(syncs)))[:200]})
            log(f"profile {name} {label} {part}: {rows[-1]}")
            if part in ("EPR step", "rate fwd+bwd"):
                sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
                text += (f"\n### {name} {label} {part}: by device time\n\n```\n"
                         + events.table(sort_by=sort, row_limit=18, max_name_column_width=60) + "```\n")
                if device == "cuda":
                    text += (f"\n### {name} {label} {part}: by host time\n\n```\n"
                             + events.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60)
                             + "```\n")
        differences[label] = op_differences(per_op["EPR step"], per_op["plain step"])
        where = "device" if device == "cuda" else "host"
        text += (f"\n### {name} {label}: EPR step less plain step, by operation ({where} ms per step, largest "
                 "differences)\n\n"
                 + markdown_table(differences[label][:15] + differences[label][-1:]) + "\n")
    return rows, text, {name: differences}


def op_times(events, device: str, calls: int) -> dict[str, tuple[float, float]]:
    """Per operator (aten operations and autograd functions, as the host launched them): (calls, ms) per profiled
    call, the ms being the device time of the kernels it launched itself on CUDA, its own host time elsewhere."""
    cuda = device == "cuda"
    return {e.key: (e.count / calls, (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1000 / calls)
            for e in events if e.device_type.name == "CPU" and not getattr(e, "is_user_annotation", False)}


def op_differences(epr: dict, plain: dict) -> list[dict]:
    """Every operation of two steps' :func:`op_times`, the largest difference in time first, then the total."""
    def row(name: str, ours: tuple[float, float], theirs: tuple[float, float]) -> dict:
        return {"operation": name[:70], "epr_calls": round(ours[0], 1), "plain_calls": round(theirs[0], 1),
                "epr_ms": round(ours[1], 3), "plain_ms": round(theirs[1], 3),
                "difference_ms": round(ours[1] - theirs[1], 3)}

    pairs = [(k, epr.get(k, (0, 0)), plain.get(k, (0, 0))) for k in set(epr) | set(plain)]
    pairs.sort(key=lambda p: -abs(p[1][1] - p[2][1]))
    totals = [tuple(map(sum, zip(*side.values()))) if side else (0, 0) for side in (epr, plain)]
    return [row(*p) for p in pairs] + [row("all operations", *totals)]


def fsdp_worker(out: str, small: bool) -> None:
    """Run under ``accelerate launch`` with FSDP2: a few EPRTrainer steps, save, and the latents' digest."""
    torch.manual_seed(0)
    base = AutoModelForImageClassification.from_config(MODELS["resnet50"][1]()).eval()
    model = EPRModel.from_base(base, EPRConfig(rate_lambda=0.5))
    args = EPRTrainingArguments(output_dir=out, max_steps=6, per_device_train_batch_size=8, report_to="none",
                                save_strategy="no", logging_steps=3, disable_tqdm=True, label_preservation="off")
    trainer = EPRTrainer(model=model, args=args, train_dataset=images(64, 32, 10))
    trainer.train()
    trainer.save_model(os.path.join(out, "repo"))
    epr = trainer.accelerator.unwrap_model(trainer.model)
    result = {"fsdp": trainer.is_fsdp_enabled, "parameter_type": type(next(trainer.model.parameters())).__name__,
              "digest": digest(epr.integer_latents())}
    if trainer.args.process_index == 0:
        Path(out, "fsdp.json").write_text(json.dumps(result))


def check_fsdp2(scratch: str, small: bool) -> dict:
    out = os.path.join(scratch, "fsdp2")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes" / "accelerate_fsdp2.yaml"),
           "--num_processes", "1", "--main_process_port", "29561", __file__, "--fsdp-worker", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if "Error" in line or "error" in line]
        return {"fsdp2": "failed", "errors": " / ".join(dict.fromkeys(errors))[:1500], "stderr": proc.stderr[-3000:]}
    result = json.loads(Path(out, "fsdp.json").read_text())
    result["reloaded_latents_equal"] = digest(EPRModel.from_pretrained(os.path.join(out, "repo")).integer_latents()) \
        == result["digest"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny configs (CPU smoke run of the same code paths)")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run (after --warmup)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--no-load-times", action="store_true", help="skip the fresh-process load timings")
    parser.add_argument("--check-models", nargs="*", default=None,
                        help="models that also get the evaluate/save/load checks (default: all)")
    parser.add_argument("--no-auto", action="store_true", help="skip the label-preservation 'auto' runs")
    parser.add_argument("--compile", action="store_true",
                        help="also time the plain and EPR ('off') steps with torch_compile=True")
    parser.add_argument("--out", default=None, help="also copy the results here (a folder)")
    parser.add_argument("--profile", action="store_true",
                        help="only profile the steps of --models (plain, EPR, its rate, two EPR variants): "
                             "gpu_check_profile.md")
    parser.add_argument("--fsdp-worker", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fsdp_worker:
        return fsdp_worker(args.fsdp_worker, True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    log(f"device: {name}; torch {torch.__version__}")
    t0 = time.time()
    if args.profile:
        rows, details, differences = [], "", {}
        for model in args.models:
            r, d, diff = profile_model(model, args, device)
            rows, details = rows + r, details + d
            differences.update(diff)
        text = (f"Device: {name}; torch {torch.__version__}; batch {8 if args.small else 64}, "
                f"{args.steps} timed steps; wall {time.time() - t0:.0f} s\n\n" + markdown_table(rows) + "\n" + details)
        data = {"device": name, "torch": torch.__version__, "rows": rows, "epr_less_plain": differences}
        save_results("gpu_check_profile", text, data, quick=args.small)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            Path(args.out, "gpu_check_profile.md").write_text(text)
            Path(args.out, "gpu_check_profile.json").write_text(json.dumps(data, indent=1))
        return
    steps, checks = [], []
    with tempfile.TemporaryDirectory() as scratch:
        fsdp: dict = {}

        def report() -> tuple[str, dict]:
            text = (f"Device: {name}; torch {torch.__version__}; batch {8 if args.small else 64}, "
                    f"{args.steps} timed steps after {args.warmup}; wall {time.time() - t0:.0f} s\n\n"
                    "## Step time: EPRTrainer vs plain Trainer\n\n" + markdown_table(steps)
                    + "\n\n## Rate term, coded size, saving and loading\n\n" + markdown_table(checks)
                    + "\n\n## FSDP2 through accelerate (one process)\n\n"
                    + markdown_table([{k: v for k, v in fsdp.items() if k != "stderr"}]) + "\n")
            data = {"device": name, "torch": torch.__version__, "steps": steps, "checks": checks, "fsdp2": fsdp,
                    "args": vars(args)}
            if args.out:  # after every model: a run stopped early still leaves what it measured
                os.makedirs(args.out, exist_ok=True)
                Path(args.out, "gpu_check.md").write_text(text)
                Path(args.out, "gpu_check.json").write_text(json.dumps(data, indent=1, default=str))
            return text, data

        for model in args.models:
            rows, check = check_model(model, args, device, scratch)
            steps += rows
            checks.append(check)
            report()
        fsdp = check_fsdp2(scratch, args.small)
        log(f"fsdp2: {fsdp.get('errors') or fsdp}")
        save_results("gpu_check", *report(), quick=args.small)


if __name__ == "__main__":
    main()
