"""A reader never sees a torn pointer: thousands of commits against a continuous reader."""

from __future__ import annotations

import os
import threading

from commitpoint.core.pointer import advance_pointer
from commitpoint.testing import CheckpointRoot

COMMITS = 3000


def test_local_pointer_reads_always_parse_and_never_go_back(
    local_checkpoint_root: CheckpointRoot,
) -> None:
    storage = local_checkpoint_root.open()
    name = "latest_state_dict_iteration.txt"
    path = storage.full_path(name)
    done = threading.Event()
    seen: list[int] = []
    torn: list[bytes] = []

    def read_raw() -> None:
        # A plain open()/read(), exactly what verl-style readers do, not our own reader.
        last = -1
        while not done.is_set():
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                continue
            if not data.strip().isdigit():
                torn.append(data)
                continue
            value = int(data)
            if value < last:
                torn.append(data)
            last = value
            seen.append(value)

    reader = threading.Thread(target=read_raw)
    reader.start()
    try:
        for step in range(1, COMMITS + 1):
            advance_pointer(storage, name, step)
    finally:
        done.set()
        reader.join()
    assert torn == []
    assert len(seen) > 100  # the reader really raced the writer
    assert storage.read_pointer(name).value == COMMITS
    leftovers = [f for f in os.listdir(os.path.dirname(path)) if ".tmp-" in f]
    assert leftovers == []
