"""Example from docs/tiered.md: commit to local disk, replicate to S3, lose the machine, resume
from the replica. It runs as written (S3 is moto, through commitpoint's pytest fixtures)."""

import torch

from commitpoint import CheckpointCoordinator, CheckpointMonitor, RetentionPolicy, save_torch
from commitpoint.replication import ReplicationOptions, TieredReader
from commitpoint.testing import CheckpointRoot


def train(local_dir: str, bucket_url: str, s3_options: dict, steps: int) -> dict:
    model = torch.nn.Linear(8, 1)
    monitor = CheckpointMonitor(
        local_dir,  # training waits on this tier only
        retention=RetentionPolicy(keep_last=2),  # never deletes what S3 lacks yet
        replicate_to=bucket_url,
        replicate_options=ReplicationOptions(
            storage_options=s3_options,
            retention=RetentionPolicy(keep_last=1, keep_every=4),  # the remote tier's own policy
        ),
    )
    ckpt = CheckpointCoordinator(monitor)
    for step in range(1, steps + 1):
        model(torch.randn(16, 8)).pow(2).mean().backward()
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        ckpt.save_async(
            "model",
            lambda s=step, w=weights: save_torch(ckpt.storage, f"global_step_{s}/model.pt", w),
            step,
            is_state_dict=True,
        )
        ckpt.register_and_monitor_sync(step, is_state_dict=True, state_dict_thread_count=1)
        status = monitor.replication_status()  # lag in steps, seconds and bytes
        assert status is not None and status.lag_steps >= 0
    ckpt.wait_all()
    monitor.close()  # waits until S3 names the last step
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_from_the_replica_on_a_new_machine(
    local_checkpoint_root: CheckpointRoot, s3_checkpoint_root: CheckpointRoot, tmp_path
) -> None:
    s3 = s3_checkpoint_root
    final = train(local_checkpoint_root.url, s3.url, s3.storage_options, steps=6)

    # A new machine: its local disk is empty, the replica has everything.
    reader = TieredReader(str(tmp_path / "new-disk"), s3.url, replica_options=s3.storage_options)
    chosen = reader.resolve("state_dict")  # the newest step that verifies, local copy first
    assert (chosen.step, chosen.tier.value) == (6, "replica")
    weights = chosen.load("model.pt")
    assert all(torch.equal(weights[k], final[k]) for k in final)

    # On the old machine both tiers have step 6: the local copy is preferred.
    reader = TieredReader(local_checkpoint_root.url, s3.url, replica_options=s3.storage_options)
    assert reader.resolve().tier.value == "local"
