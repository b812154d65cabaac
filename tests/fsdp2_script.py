"""Run by tests/test_distributed.py under torchrun with 2 CPU processes (gloo): EPRModel sharded with FSDP2
(``fully_shard`` of the whole wrapper), a few steps, then the compressed repo saved by every rank together."""

import faulthandler
import gc
import hashlib
import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from hf_epr import EPRConfig, EPRModel
from hf_epr.testing import tiny_inputs, tiny_model

faulthandler.enable()  # a native abort (SIGABRT) prints every thread's Python stack into the test's message
out = sys.argv[1]
dist.init_process_group("gloo")
rank = dist.get_rank()
model = EPRModel.from_base(tiny_model("resnet"), EPRConfig(rate_lambda=0.1, init_step_ratio=0.05)).train()
fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
sharded = type(next(model.parameters())).__name__
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
x, y = tiny_inputs("resnet", n=8, seed=rank), torch.arange(8) % 4
for _ in range(3):
    opt.zero_grad()
    outputs, bits = model(pixel_values=x, labels=y, return_bits=True)
    (outputs.loss + 0.1 * bits / model.num_compressed_parameters).backward()
    opt.step()
latents = model.integer_latents()  # every rank gathers
digest = hashlib.sha256(b"".join(latents[k].numpy().tobytes() for k in sorted(latents))).hexdigest()
with model.full_parameters():
    if rank == 0:
        model.save_pretrained(f"{out}/repo")
exact = model.exact_bits()
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"digest": digest, "parameter_type": sharded, "exact_bits": exact}, f)
# Tear down in order while the interpreter is whole: both ranks done with collectives, then the FSDP state (which
# holds the device mesh and its process group) freed, then the group destroyed; nothing of gloo is left for the
# interpreter's finalization to free.
dist.barrier()
del model, opt, outputs, bits
gc.collect()
dist.destroy_process_group()
