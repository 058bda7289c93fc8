"""A run's checkpoints on the job's storage, written by its worker and read back by the next one.

Ray Train counts a reported checkpoint only when its controller next polls the worker (every
couple of seconds) and resumes a restarted run from what it has counted, so a worker killed soon
after a report resumed from the checkpoint before, and every report waited for that poll. So the
worker keeps its own:

- at each checkpoint interval it writes its whole state as one object,
  ``<job>/checkpoints/<run>/<clock>.pt`` (``clock``: steps taken, zero-padded so names sort by
  it). A PUT is atomic, so a checkpoint is whole or absent; the write does not wait for anyone;
- a restarted worker (a new attempt, a refit after its controller died, a resubmitted job) starts
  from the newest checkpoint that loads, skipping any that does not;
- only the newest ``keep`` are kept: older ones are deleted as each new one lands, so nothing
  accumulates however often the run is killed.

Ray Train sees none of this: the run reports nothing until it ends, and the driver reads the
final state from here. Loading uses ``torch.load(weights_only=True)``: tensors and plain
containers, never arbitrary pickled objects.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from pipeline.store.storage import ObjectNotFoundError, Storage

SUFFIX = ".pt"


def checkpoint_prefix(job: str, run: str) -> str:
    return f"{job}/checkpoints/{run}/"


def checkpoint_keys(storage: Storage, job: str, run: str) -> list[str]:
    """The run's checkpoints on ``storage``, oldest first."""
    return sorted(o.key for o in storage.list(checkpoint_prefix(job, run)) if o.key.endswith(SUFFIX))


def write_checkpoint(storage: Storage, job: str, run: str, clock: int, state: dict[str, Any], keep: int) -> str:
    """Writes ``state`` as the run's checkpoint at ``clock`` and deletes all but the newest ``keep``."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    key = f"{checkpoint_prefix(job, run)}{clock:010d}{SUFFIX}"
    storage.put(key, buffer.getvalue())
    for old in checkpoint_keys(storage, job, run)[:-keep]:
        storage.delete(old)
    return key


def newest_checkpoint(storage: Storage, job: str, run: str) -> dict[str, Any] | None:
    """The newest of the run's checkpoints that loads (None if there is none)."""
    for key in reversed(checkpoint_keys(storage, job, run)):
        try:
            return torch.load(io.BytesIO(storage.get(key)), map_location="cpu", weights_only=True)
        except ObjectNotFoundError:
            continue  # deleted by a newer worker meanwhile
        except Exception as err:  # unreadable (truncated by a dying local write, say): the one before
            print(f"checkpoint {key} does not load ({type(err).__name__}); trying the one before", flush=True)
    return None
