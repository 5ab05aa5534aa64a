"""FSDP2 training that checkpoints through commitpoint.dcp and resumes from the latest commit.

    torchrun --nproc-per-node 2 docs/examples/dcp_fsdp2.py /tmp/run-7    # or s3://..., gs://...

Rank 0 owns the monitor; the other ranks write through a plain backend of the same root.
Every other step the weights are exported as safetensors (a state-dict step rollout workers can
load as a model folder) and the full checkpoint (model + optimizer, sharded) is saved in the
background. Run it again and it resumes where the last committed checkpoint left off.
"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import fully_shard

import commitpoint.dcp as cdcp
from commitpoint import CheckpointCoordinator, CheckpointMonitor, CheckpointReader, open_storage


def main(root: str, steps: int = 4) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    target = CheckpointCoordinator(CheckpointMonitor(root)) if rank == 0 else open_storage(root)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    for layer in (model[0], model[2], model):
        fully_shard(layer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)

    start = 0
    if CheckpointReader(root).latest_checkpoint_step() is not None:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        start = cdcp.load(state, root)  # the latest committed checkpoint, every byte verified
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )

    pending = None
    for step in range(start + 1, start + steps + 1):
        model(torch.randn(8, 16)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 2 == 0:
            if pending is not None:
                pending.result()  # the previous checkpoint is committed (or raises SaveFailed)
            config = {"model_type": "toy-mlp", "hidden_size": 32}
            cdcp.export_safetensors(get_model_state_dict(model), target, step, config=config)
            model_sd, optim_sd = get_state_dict(model, optimizer)
            pending = cdcp.async_save({"model": model_sd, "optim": optim_sd}, target, step)
    if pending is not None:
        pending.result()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
