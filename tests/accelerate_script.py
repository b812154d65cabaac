"""Run by tests/test_accelerate.py under `accelerate launch --num_processes 2`: a few EPRTrainer steps."""

import hashlib
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_trainer import mnist_subset, reference  # noqa: E402

from hf_epr import EPRConfig, EPRModel, EPRTrainer, EPRTrainingArguments  # noqa: E402

out = sys.argv[1]
teacher = reference(steps=30)
torch.manual_seed(0)
model = EPRModel.from_base(reference(steps=30), EPRConfig(rate_lambda=2.0, init_step_ratio=1 / 64))
args = EPRTrainingArguments(output_dir=out, max_steps=8, per_device_train_batch_size=32, logging_steps=4,
                            report_to=[], save_strategy="no", disable_tqdm=True, seed=0, use_cpu=True,
                            decoder_learning_rate=0.05, ddp_backend="gloo")
trainer = EPRTrainer(model=model, reference_model=teacher, args=args, train_dataset=mnist_subset(512))
trainer.train()
trainer.save_model(out + "/repo")
latents = trainer.model.integer_latents()
digest = hashlib.sha256(b"".join(latents[k].numpy().tobytes() for k in sorted(latents))).hexdigest()
rank = trainer.args.process_index
logged = [h["bits"] for h in trainer.state.log_history if "bits" in h]
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"digest": digest, "world": trainer.args.world_size, "exact_bits": trainer.model.exact_bits(),
               "logged_bits": logged}, f)
