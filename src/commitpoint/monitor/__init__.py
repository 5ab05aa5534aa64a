"""Accounting and commits: the step ledger, the commit pipeline, save slots, and the transport
that lets coordinators reach a monitor in-process or as a Ray actor."""

from commitpoint.monitor.service import CheckpointMonitor
from commitpoint.monitor.slots import SaveStrategy

__all__ = ["CheckpointMonitor", "SaveStrategy"]
