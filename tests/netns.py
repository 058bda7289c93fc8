"""Run this process's work in a loopback-only network namespace (Linux, root or user namespaces).

Ray listens on every interface and advertises the machine's address; tests and benchmarks that
start Ray re-execute themselves under ``unshare -n`` with ``lo`` up, so everything they start is
reachable only on 127.0.0.1 of a namespace that can reach nothing else.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable

MARKER = "ONEWORD_TEST_NETNS"


def isolated() -> bool:
    return os.environ.get(MARKER) == "1"


def reexec_isolated(argv: list[str], before_exec: Callable[[], None] | None = None) -> None:
    """Replaces this process with ``argv`` run inside a new loopback-only network namespace.
    Returns without doing anything when already isolated (or where ``unshare`` is missing).
    ``before_exec`` is this process's cleanup: exec skips ``atexit``."""
    if isolated() or sys.platform != "linux" or not shutil.which("unshare"):
        return
    if before_exec is not None:
        before_exec()
    os.environ[MARKER] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    isolate = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
    os.execvp("unshare", [*isolate, "--", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', *argv])
