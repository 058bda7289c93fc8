"""Reading Ray's Prometheus endpoint in tests: oneword's series, with oneword's own labels only."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import httpx

# How often the test head's processes report to its metrics agent (Ray's default: 10 s). The agent
# keeps a gauge for two intervals after its last report, so a finished job driver's gauges are
# readable for 10 s, and Serve's status gauges (set every 10 s when unchanged) may blink out.
REPORT_INTERVAL_S = 5


def scrape(url: str) -> dict[str, float]:
    """Prometheus text format -> {"name{labels}": value} for oneword's series, keeping only oneword's
    own labels (Ray adds node, worker and session labels), summed over replicas."""
    values: dict[str, float] = {}
    for line in httpx.get(url, timeout=30).text.splitlines():
        if line.startswith("ray_oneword_"):
            series, _, value = line.rpartition(" ")
            labels = sorted((k, v) for k, v in re.findall(r'(\w+)="([^"]*)"', series) if k in OWN_LABELS)
            key = series.split("{")[0] + "{" + ",".join(f"{k}={v}" for k, v in labels) + "}"
            values[key] = values.get(key, 0.0) + float(value)
    return values


OWN_LABELS = {"route", "status", "reason", "outcome", "le", "job", "state", "backend", "operation"}


def until(url: str, done: Callable[[dict[str, float]], bool], timeout: float = 90) -> dict[str, float]:
    """Scrapes every second until ``done`` holds for a scrape (returned), or returns the last one at
    the deadline, for the caller's assertion to show what was there."""
    deadline = time.monotonic() + timeout
    while not done(values := scrape(url)) and time.monotonic() < deadline:
        time.sleep(1)
    return values


def names(url: str) -> set[str]:
    """Every metric name on the endpoint (Ray's and Serve's too), without labels."""
    lines = httpx.get(url, timeout=30).text.splitlines()
    return {line.split("{")[0].split(" ")[0] for line in lines if line and not line.startswith("#")}


def settled(url: str, families: tuple[str, ...]) -> dict[str, float]:
    """A scrape after which nothing reported earlier is still on its way: two in a row, a report
    interval and a second apart, that agree on the series of ``families`` (key prefixes; a
    replica's own background reads, which other families count, need not stop)."""

    def watched(values: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in values.items() if k.startswith(families)}

    last = scrape(url)
    while True:
        time.sleep(REPORT_INTERVAL_S + 1)
        now = scrape(url)
        if watched(now) == watched(last):
            return now
        last = now
