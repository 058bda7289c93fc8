"""Packs: concepts trained together give what they give alone, leave alone, refill, and resume exactly."""

import pytest
import torch

from pipeline.engine.data import load_images
from pipeline.engine.inversion import DivergedError, Inversion
from pipeline.engine.packing import Pack, Request
from pipeline.engine.training import run_steps
from pipeline.errors import InputError
from pipeline.shapesworld.world import write_concept_images

from .conftest import roundtrip, small_config

# Packed and solo runs differ only in how many rows the UNet and the text encoder see at once,
# which changes the order of some float32 sums (reassociation). Measured on these concepts: at
# most 1.5e-7 apart after 6 and after 30 steps (entries up to 0.4). 1e-5 leaves room for other
# CPUs' kernels and still catches any real difference in samples or gradients, which moves an
# entry by up to the learning rate (5e-3) per step.
ATOL = 1e-5


@pytest.fixture(scope="module")
def shape_images(tmp_path_factory) -> dict[str, torch.Tensor]:
    """Five concepts' images, one folder each."""
    out = tmp_path_factory.mktemp("shapes")
    kinds = {"star": "yellow", "cross": "blue", "ring": "red", "arrow": "green", "square": "white"}
    return {shape: load_images(write_concept_images(out / shape, shape, colour, count=3, size=64, seed=1), 64)
            for shape, colour in kinds.items()}  # fmt: skip


def mixed_requests(images: dict[str, torch.Tensor], steps: int = 6) -> list[Request]:
    """Four concepts with different settings: two vectors, edit consistency (with references),
    per-image tokens and gradient accumulation, another seed, learning rate, batch size and selection."""
    configs = {
        "star": small_config(steps=steps, num_vectors=2),
        "cross": small_config(
            steps=steps,
            edit_words=["green"],
            edit_reference_words=["circle", "ring"],
            edit_consistency=0.5,
            regularization_weight=1e-3,
            average_decay=0.9,
        ),
        "ring": small_config(steps=steps, per_image_tokens=True, grad_accum=2, seed=11),
        "arrow": small_config(steps=steps, learning_rate=2e-2, batch_size=3, seed=5, selection_interval=2),
    }
    return [Request(name, config, lambda name=name: images[name]) for name, config in configs.items()]


def solo(model, request: Request) -> torch.Tensor:
    engine = Inversion(model, request.images(), request.config, request.name)
    run_steps(engine, lambda *_: None)
    return engine.learned_vectors()


def run_pack(model, requests: list[Request], size: int, **callbacks) -> tuple[dict, dict]:
    results, failures = {}, {}
    pack = Pack(model, requests, size)
    pack.run(finished=lambda e: results.setdefault(e.name, e.learned_vectors()),
             failed=lambda name, why: failures.setdefault(name, why), **callbacks)  # fmt: skip
    return results, failures


def test_a_packed_concept_learns_what_it_learns_alone(model, shape_images):
    requests = mixed_requests(shape_images)
    packed, failures = run_pack(model, requests, size=4)
    assert not failures and set(packed) == {r.name for r in requests}
    for request in requests:
        alone = solo(model, request)
        assert packed[request.name].shape == alone.shape
        assert torch.allclose(packed[request.name], alone, atol=ATOL), request.name
        untrained = Inversion(model, request.images(), request.config, request.name).learned_vectors()
        assert not torch.equal(alone, untrained)  # the comparison is not between two unmoved words


def test_slots_refill_until_the_queue_is_empty(model, shape_images):
    requests = mixed_requests(shape_images)
    requests[0] = Request("star", small_config(steps=3, num_vectors=2), requests[0].images)  # leaves early
    requests.append(Request("square", small_config(steps=4, seed=8), lambda: shape_images["square"]))
    occupancy = []
    packed, failures = run_pack(model, requests, size=2,
                                after_step=lambda e, due: occupancy.append((e.name, e.step_count)))  # fmt: skip
    assert not failures and set(packed) == {r.name for r in requests}
    # every concept ran all of its steps, never more than two at a time
    for request in requests:
        assert [s for n, s in occupancy if n == request.name] == list(range(1, request.config.steps + 1))
    for request in requests:
        assert torch.allclose(packed[request.name], solo(model, request), atol=ATOL), request.name


def test_a_diverging_or_broken_concept_leaves_alone(model, shape_images, tmp_path):
    requests = mixed_requests(shape_images)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    broken = Request("broken", small_config(), lambda: load_images(tmp_path, 64))
    runaway = Request("runaway", small_config(steps=6, learning_rate=10.0), lambda: shape_images["square"])
    with_bad, failures = run_pack(model, [requests[0], runaway, broken, *requests[1:]], size=3)
    without, _ = run_pack(model, requests, size=3)
    assert set(failures) == {"runaway", "broken"}
    assert "lower the learning rate" in failures["runaway"] and "broken.png" in failures["broken"]
    assert set(with_bad) == set(without)
    for name, vectors in without.items():
        assert torch.allclose(with_bad[name], vectors, atol=ATOL), name


def test_a_concept_whose_loss_is_nan_leaves_alone(model, shape_images):
    """Images holding a NaN make the loss NaN at the first step: that concept is not stepped and
    leaves with the reason; the others equal a pack run without it."""
    requests = mixed_requests(shape_images)
    poisoned = shape_images["square"].clone()
    poisoned[0, 0, 0, 0] = float("nan")
    nan = Request("nan", small_config(steps=6), lambda: poisoned)
    with_nan, failures = run_pack(model, [nan, *requests], size=3)
    without, _ = run_pack(model, requests, size=3)
    assert set(failures) == {"nan"} and failures["nan"].startswith("loss became nan at step 1")
    for name, vectors in without.items():
        assert torch.allclose(with_nan[name], vectors, atol=ATOL), name


def test_a_cancelled_concept_leaves_and_the_rest_go_on(model, shape_images):
    requests = mixed_requests(shape_images)
    pack = Pack(model, requests, size=2)
    pack.cancel("arrow")  # waiting: never takes a slot
    results, failures = {}, {}

    def after_step(engine, due):
        if engine.name == "cross" and engine.step_count == 2:
            pack.cancel("cross")  # running: leaves at the next step

    pack.run(finished=lambda e: results.setdefault(e.name, e.learned_vectors()),
             failed=lambda name, why: failures.setdefault(name, why), after_step=after_step)  # fmt: skip
    assert failures == {"arrow": "cancelled", "cross": "cancelled"} and set(results) == {"star", "ring"}


def test_a_solo_run_that_diverges_stops_with_the_reason(model, star_images):
    engine = Inversion(model, star_images, small_config(learning_rate=10.0), "star")
    with pytest.raises(DivergedError, match="star: .*lower the learning rate"):
        run_steps(engine, lambda *_: None)


def test_an_interrupted_pack_resumes_bit_identically(model, shape_images):
    requests = mixed_requests(shape_images, steps=7)
    requests.append(Request("square", small_config(steps=5, checkpoint_interval=2), lambda: shape_images["square"]))
    straight, _ = run_pack(model, requests, size=3)

    saved = []

    class WorkerKilledError(Exception):
        pass

    def checkpoint(state):
        saved.append(roundtrip(state))
        if state["next"] == len(requests) and any(state["slots"]):
            raise WorkerKilledError  # the worker dies after a checkpoint taken once refilled slots were running

    with pytest.raises(WorkerKilledError):
        run_pack(model, requests, size=3, checkpoint=checkpoint)
    state = saved[-1]
    running = {slot["name"]: slot["step"] for slot in state["slots"] if slot}
    assert running and all(0 < step < requests[-1].config.steps + 3 for step in running.values())

    resumed_pack = Pack(model, requests, size=3)
    resumed_pack.load_state_dict(state)
    resumed = {}
    resumed_pack.run(finished=lambda e: resumed.setdefault(e.name, e.learned_vectors()))
    assert set(resumed) == set(running)
    for name, vectors in resumed.items():
        assert torch.equal(vectors, straight[name]), name
    # one concept's state taken out of the pack checkpoint resumes alone
    entry = next(slot for slot in state["slots"] if slot is not None)
    request = next(r for r in requests if r.name == entry["name"])
    alone = Inversion(model, request.images(), request.config, request.name)
    alone.load_state_dict(entry)
    run_steps(alone, lambda *_: None)
    assert torch.allclose(alone.learned_vectors(), straight[request.name], atol=ATOL)


def test_a_pack_refuses_bad_settings(model, shape_images):
    request = mixed_requests(shape_images)[0]
    with pytest.raises(InputError, match="at least 1"):
        Pack(model, [request], size=0)
    with pytest.raises(InputError, match="distinct names"):
        Pack(model, [request, request], size=2)
    pack = Pack(model, [request], size=2)
    with pytest.raises(InputError, match="2 slots, this pack 3"):
        Pack(model, [request], size=3).load_state_dict(pack.state_dict())


def test_a_resubmitted_pack_keeps_running_concepts_and_retries_failed_ones(model, shape_images):
    """``exact=False``: running concepts continue from their state, the queue is walked again."""
    good = mixed_requests(shape_images, steps=8)[:2]
    runaway = Request("runaway", small_config(steps=8, learning_rate=10.0), lambda: shape_images["square"])
    requests = [good[0], runaway, good[1]]
    states, done = [], {}
    pack = Pack(model, requests, size=2)
    pack.run(finished=lambda e: done.setdefault(e.name, e.learned_vectors()), checkpoint=states.append)
    middle = next(s for s in states if any(s["slots"]))  # a checkpoint with a concept still running
    running = {slot["name"] for slot in middle["slots"] if slot}

    again, finished, failed = Pack(model, requests, size=2), {}, {}
    again.load_state_dict(middle, exact=False)
    again.run(finished=lambda e: finished.setdefault(e.name, e.learned_vectors()),
              failed=lambda name, why: failed.setdefault(name, why),
              skip=lambda name: name in done and name not in running)  # fmt: skip
    assert set(failed) == {"runaway"} and set(finished) == running - {"runaway"}
    for name, vectors in finished.items():
        assert torch.allclose(vectors, done[name], atol=ATOL)
