"""Example from docs/testing.md: a team's training loop, tested against local disk, S3 (moto) and
GCS (fake-gcs-server) with commitpoint's pytest fixtures. It runs as written."""

import torch

from commitpoint import CheckpointCoordinator, save_torch
from commitpoint.testing import CheckpointRoot


def train(storage_url: str, storage_options: dict, steps: int, save_every: int) -> None:
    """The code under test: trains and checkpoints in the background."""
    from commitpoint import CheckpointMonitor

    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = CheckpointCoordinator(CheckpointMonitor(storage_url, storage_options))
    for step in range(1, steps + 1):
        loss = model(torch.randn(16, 8)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % save_every == 0:
            weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
            ckpt.save_async(
                "model",
                lambda s=step, w=weights: save_torch(ckpt.storage, f"global_step_{s}/model.pt", w),
                step,
                is_state_dict=True,
            )
            ckpt.register_and_monitor_sync(step, is_state_dict=True, state_dict_thread_count=1)
    ckpt.wait_all()


def test_training_commits_verifiable_weights(checkpoint_root: CheckpointRoot) -> None:
    train(checkpoint_root.url, checkpoint_root.storage_options, steps=12, save_every=4)

    assert checkpoint_root.committed_steps() == {"state_dict": 12, "checkpoint": None}
    assert checkpoint_root.verify(12).ok
    files = [f.path for f in checkpoint_root.list_files("global_step_12")]
    assert "global_step_12/model.pt" in files
    weights = checkpoint_root.reader().load(12, "model.pt")
    assert weights["weight"].shape == (1, 8)
