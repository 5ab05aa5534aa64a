"""torch.distributed.checkpoint (DCP) on commitpoint storage: FSDP2, torchtitan, Megatron-core.

- :func:`save` / :func:`async_save`: every rank writes its part through the backend
  (checksummed as it streams), the coordinator rank writes ``.metadata``, and the step commits
  once every rank's part is durable. A committed step or a fenced writer is refused before any
  rank writes a byte, on every rank alike.
- :func:`load`: DCP's resharding load (any number of ranks) of a committed step, every byte
  verified against the manifest first.
- :class:`StorageWriter` / :class:`StorageReader`: the same as DCP storage classes, for code
  that calls ``torch.distributed.checkpoint`` itself.
- :func:`export_safetensors`: a weights-only step in safetensors that transformers and vLLM load
  as a folder.

Needs PyTorch (``pip install './[dcp]'`` from this repository).
"""

from commitpoint.dcp.api import async_save, load, save
from commitpoint.dcp.export import export_safetensors
from commitpoint.dcp.reader import StorageReader
from commitpoint.dcp.writer import StorageWriter

__all__ = ["StorageReader", "StorageWriter", "async_save", "export_safetensors", "load", "save"]
