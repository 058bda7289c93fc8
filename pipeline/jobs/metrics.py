"""Bulk jobs' metrics (see ``pipeline.metrics`` for how they are exported). Every series is
labelled by job id only (and a state), never by concept: a job of thousands of concepts stays a
handful of series. Steps per second is ``rate(ray_oneword_train_steps_total[1m])``.
"""

from __future__ import annotations

from pipeline.metrics import COUNT_BOUNDARIES, LATENCY_BOUNDARIES, counter, gauge, histogram

LOSS_BOUNDARIES = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0]

concepts = gauge("job_concepts", "a job's concepts by state: pending, running, published, skipped, failed",
                 "job", "state")  # fmt: skip
steps = counter("train_steps", "training steps taken (all of a job's runs; packs count one per concept)", "job")
loss = histogram("train_loss", "training loss at each log interval", LOSS_BOUNDARIES, "job")
restarts = counter("run_restarts", "runs (concept or pack) started again after a worker died or on resubmission",
                   "job")  # fmt: skip
storage_wait = counter("storage_wait_seconds", "seconds spent waiting out an unreachable object store", "job")
checkpoint_seconds = histogram("checkpoint_seconds", "writing and reporting one checkpoint", LATENCY_BOUNDARIES, "job")
publish_seconds = histogram("publish_seconds", "publishing one concept to the registry", LATENCY_BOUNDARIES, "job")
pack_occupancy = histogram("pack_active_slots", "a pack's slots in use, at each checkpoint", COUNT_BOUNDARIES, "job")
