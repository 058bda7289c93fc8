"""Reading Ray's Prometheus endpoint in tests: oneword's series, with oneword's own labels only."""

from __future__ import annotations

import re
import time

import httpx


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


def settled(url: str) -> dict[str, float]:
    """A scrape after which nothing reported earlier is still on its way (workers report every 10 s)."""
    last = scrape(url)
    while True:
        time.sleep(11)
        now = scrape(url)
        if now == last:
            return now
        last = now
