"""Packs: many concepts trained together on one loaded model, in slots that refill.

Every model weight is frozen and a concept owns only its few vectors, so K concepts can share each
forward and backward pass (``inversion.packed_step``): one micro-batch holds samples of all of
them, each caption carries its own concept's vectors, and each concept's gradient is exactly what
it would get alone. A pack holds up to ``size`` engines. When one reaches its steps it is handed to
``finished`` and the next waiting concept takes its slot, without reloading the model (continuous
batching, applied to training), so a pack runs until its queue is empty. A concept whose loss stops
being finite, that runs off, or that is cancelled leaves with its reason; the others go on as if it
had never been there.

    pack = Pack(model, [Request("my-dog", config, lambda: load_images(files, 512)), ...], size=4)
    pack.run(finished=publish, failed=record)

The pack's state (every slot's engine state and the queue position) is one checkpoint. A slot's
entry is an ordinary ``Inversion.state_dict()``, so one concept can be taken out and resumed alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.engine.config import InversionConfig
from pipeline.engine.inversion import Inversion, packed_step
from pipeline.engine.model import BaseModel
from pipeline.engine.training import Due, diverged, due_after
from pipeline.errors import InputError

PACK_STATE_FORMAT = 1


@dataclass(frozen=True)
class Request:
    """A concept waiting for a slot. ``images`` is called when it gets one (a bulk job fetches the
    images only then); an ``InputError`` from it, or from the config, fails that concept alone."""

    name: str
    config: InversionConfig
    images: Callable[[], torch.Tensor]


def _ignore(*_: Any) -> None:
    return None


class Pack:
    """Up to ``size`` concepts of ``queue`` training at once on ``model``; see the module docstring."""

    def __init__(self, model: BaseModel, queue: Sequence[Request], size: int):
        if size < 1:
            raise InputError(f"pack size must be at least 1, got {size}")
        names = [request.name for request in queue]
        if len(set(names)) != len(names):
            raise InputError("a pack's concepts need distinct names")
        self.model, self.queue, self.size = model, list(queue), size
        self.slots: list[Inversion | None] = [None] * size
        self.next = 0  # the queue position of the next concept to take a slot
        self.cancelled: set[str] = set()
        self.started: set[str] = set()  # concepts that have had a slot in this run (never given a second)
        self.steps_run = 0  # packed steps taken: the pack's clock for its checkpoints

    def active(self) -> list[Inversion]:
        return [engine for engine in self.slots if engine is not None]

    def slot_of(self, name: str) -> int | None:
        return next((i for i, engine in enumerate(self.slots) if engine and engine.name == name), None)

    def cancel(self, name: str) -> None:
        """Takes a concept out (from its slot at the next step, or before it gets one)."""
        self.cancelled.add(name)

    def run(
        self,
        finished: Callable[[Inversion], None],
        failed: Callable[[str, str], None] = _ignore,
        after_step: Callable[[Inversion, Due], None] = _ignore,
        checkpoint: Callable[[dict[str, Any]], None] = _ignore,
        skip: Callable[[str], bool] = lambda name: False,
    ) -> None:
        """Trains until the queue is empty and every slot has finished or failed.

        ``after_step(engine, due)`` runs for each concept after each step, as in ``run_steps``;
        ``finished(engine)`` when a concept reaches its steps (before its slot is refilled);
        ``failed(name, reason)`` when one leaves early; ``skip(name)``, when a concept's turn for a
        slot comes, may pass it over (a bulk job's concept already published).

        ``checkpoint(state)`` runs on the pack's own clock: every ``checkpoint_interval`` packed
        steps (the smallest of the running concepts'), so a concept loses at most its own interval
        to an interruption, and once more when the pack has finished. A concept finished since the
        last checkpoint is trained again from it after an interruption: ``finished`` must be
        idempotent (a bulk job looks its concept up in the registry before publishing).
        """
        while True:
            self._fill(failed, skip)
            engines = self.active()
            if not engines:
                checkpoint(self.state_dict())
                return
            interval = min(engine.config.checkpoint_interval for engine in engines)
            packed_step(engines)
            self.steps_run += 1
            for slot, engine in enumerate(self.slots):
                if engine is None:
                    continue
                reason = "cancelled" if engine.name in self.cancelled else diverged(engine)
                if reason is not None:
                    self.slots[slot] = None
                    failed(engine.name, reason)
                    continue
                after_step(engine, due_after(engine))
                if engine.step_count >= engine.config.steps:
                    finished(engine)
                    self.slots[slot] = None
            if self.steps_run % interval == 0:
                checkpoint(self.state_dict())

    def _fill(self, failed: Callable[[str, str], None], skip: Callable[[str], bool]) -> None:
        """Gives every empty slot the next waiting concept that can start."""
        for slot in range(self.size):
            while self.slots[slot] is None and self.next < len(self.queue):
                request = self.queue[self.next]
                self.next += 1
                if request.name in self.cancelled:
                    failed(request.name, "cancelled")
                    continue
                if request.name in self.started or skip(request.name):
                    continue
                self.started.add(request.name)
                try:
                    self.slots[slot] = Inversion(self.model, request.images(), request.config, request.name)
                except InputError as err:
                    failed(request.name, str(err))

    def state_dict(self) -> dict[str, Any]:
        """The pack's exact resume point: each slot's engine state, the queue position, cancellations."""
        return {
            "format": PACK_STATE_FORMAT,
            "next": self.next,
            "steps_run": self.steps_run,
            "slots": [engine.state_dict() if engine else None for engine in self.slots],
            "cancelled": sorted(self.cancelled),
        }

    def load_state_dict(self, state: dict[str, Any], exact: bool = True) -> None:
        """Restores a ``state_dict()`` of a pack of the same size over the same queue.

        ``exact``: continue exactly where it stood (a restarted worker). Otherwise only the running
        concepts are restored and the queue is walked again from its start (a resubmitted job:
        what finished is passed over by ``skip``, what failed gets another try)."""
        if state.get("format") != PACK_STATE_FORMAT:
            raise InputError(f"unsupported pack checkpoint format {state.get('format')!r}")
        if len(state["slots"]) != self.size:
            raise InputError(f"pack checkpoint has {len(state['slots'])} slots, this pack {self.size}")
        requests = {request.name: request for request in self.queue}
        slots: list[Inversion | None] = []
        for entry in state["slots"]:
            if entry is None:
                slots.append(None)
                continue
            if entry["name"] not in requests:
                raise InputError(f"pack checkpoint holds {entry['name']!r}, which is not in this pack's queue")
            request = requests[entry["name"]]
            engine = Inversion(self.model, request.images(), request.config, request.name)
            engine.load_state_dict(entry)
            slots.append(engine)
        self.slots = slots
        self.started = {engine.name for engine in slots if engine is not None}
        if exact:
            self.next, self.cancelled, self.steps_run = int(state["next"]), set(state["cancelled"]), state["steps_run"]
