"""Run by tests/test_accelerate.py under `accelerate launch` with 2 CPU processes: a few EPRTrainer steps."""

import faulthandler
import hashlib
import json
import sys

from hf_epr import EPRConfig, EPRModel, EPRTrainer, EPRTrainingArguments
from hf_epr.testing import mnist_reference as reference, mnist_subset

faulthandler.enable()  # a native abort (SIGABRT) prints every thread's Python stack into the test's message
out = sys.argv[1]
teacher = reference(steps=30)
model = EPRModel.from_base(reference(steps=30), EPRConfig(rate_lambda=2.0, init_step_ratio=1 / 64))
args = EPRTrainingArguments(output_dir=out, max_steps=8, per_device_train_batch_size=32, logging_steps=4,
                            report_to=[], save_strategy="steps", save_steps=8, disable_tqdm=True, seed=0, use_cpu=True,
                            decoder_learning_rate=0.05, softadapt_interval=2, ddp_backend="gloo")
trainer = EPRTrainer(model=model, reference_model=teacher, args=args, train_dataset=mnist_subset(512))
trainer.train()
trainer.save_model(out + "/repo")
epr = trainer.accelerator.unwrap_model(trainer.model)
latents = epr.integer_latents()
digest = hashlib.sha256(b"".join(latents[k].numpy().tobytes() for k in sorted(latents))).hexdigest()
logs = [h for h in trainer.state.log_history if "bits" in h]
with open(f"{out}/rank{trainer.args.process_index}.json", "w") as f:
    json.dump({"digest": digest, "world": trainer.args.world_size, "exact_bits": epr.exact_bits(),
               "policy": trainer.policy.state_dict(), "logs": logs}, f)
