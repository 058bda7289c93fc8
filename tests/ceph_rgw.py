"""A real S3 server for tests and benchmarks: single-node Ceph RADOS Gateway on 127.0.0.1.

One monitor, one in-memory OSD (``memstore``), no cephx, and radosgw's beast frontend bound to
loopback. Starts in ~15 s; the Debian packages come from ``setup.sh --dev``. Stopped in the order
radosgw, OSD, monitor (radosgw hangs if the cluster disappears under it).

    python tests/ceph_rgw.py          # start one in the foreground, print its settings, Ctrl-C stops
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ACCESS_KEY = "oneword-test-access"
SECRET_KEY = "oneword-test-secret-0123456789"
BINARIES = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool", "ceph-authtool", "ceph")

CONF = """\
[global]
fsid = {fsid}
mon host = v1:127.0.0.1:{mon_port}
mon initial members = a
public addr = 127.0.0.1
ms bind msgr2 = false
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
auth allow insecure global id reclaim = true
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
mon max pg per osd = 1000
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = 2147483648
run dir = {root}/run
admin socket = {root}/run/$name.asok
pid file = {root}/run/$name.pid
log file = {root}/log/$name.log
mon data = {root}/mon/$name
osd data = {root}/osd/$name
keyring = {root}/keyring
log to stderr = false
err to stderr = false
[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:{rgw_port} tcp_nodelay=1
rgw data = {root}/rgw
rgw enable usage log = false
rgw dns name = 127.0.0.1
"""


def free_ports(count: int) -> list[int]:
    """Distinct free ports on 127.0.0.1 (all held open while choosing, so none repeats)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def free_port() -> int:
    return free_ports(1)[0]


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None]


@dataclass
class CephRGW:
    """A running single-node Ceph cluster with an S3 gateway; ``stop()`` removes everything."""

    root: Path
    ports: list[int] = field(default_factory=lambda: free_ports(2))

    @property
    def rgw_port(self) -> int:
        return self.ports[0]

    @property
    def mon_port(self) -> int:
        return self.ports[1]

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.rgw_port}"

    @property
    def env(self) -> dict[str, str]:
        """The oneword settings (pipeline.store.storage.S3Settings) that reach this server."""
        return {
            "ONEWORD_S3_ENDPOINT": f"http://{self.endpoint}",
            "ONEWORD_S3_ACCESS_KEY": ACCESS_KEY,
            "ONEWORD_S3_SECRET_KEY": SECRET_KEY,
            "ONEWORD_S3_REGION": "us-east-1",
        }

    def _run(self, *args: str, timeout: float = 60) -> str:
        result = subprocess.run([*args, "-c", str(self.conf)], capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr[-2000:]}")
        return result.stdout

    def start(self, timeout: float = 90, attempts: int = 3) -> CephRGW:
        """Starts the cluster, from scratch on new ports up to ``attempts`` times. On CI's busy machine
        a fresh single-node cluster once failed to come up (``ceph osd create``: 'EPERM: problem
        getting command descriptions from mon', 2026-12-03; cause not found, its logs were removed
        with it), and a port taken between choosing and binding it fails ``ceph-mon``. The last
        attempt's error carries the daemons' log tails."""
        failure = ""
        for _ in range(attempts):
            try:
                return self._start(timeout)
            except RuntimeError as error:
                failure = f"{error}\n{self._log_tails()}"
                self.stop()
                self.ports = free_ports(2)
            except BaseException:
                self.stop()
                raise
        raise RuntimeError(f"the Ceph RGW cluster did not come up in {attempts} attempts; the last one: {failure}")

    def _log_tails(self, lines: int = 15) -> str:
        """The last lines of each daemon's log (the root is removed on stop, with them)."""
        tails = []
        for log in sorted((self.root / "log").glob("*.log")):
            with contextlib.suppress(OSError):
                tails.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(tails)

    def _start(self, timeout: float) -> CephRGW:
        missing = missing_binaries()
        if missing:
            raise RuntimeError(f"Ceph is not installed (missing {', '.join(missing)}); run `bash setup.sh --dev`")
        for sub in ("run", "log", "mon/mon.a", "osd/osd.0", "rgw"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.conf = self.root / "ceph.conf"
        fsid = str(uuid.uuid4())
        self.conf.write_text(CONF.format(fsid=fsid, mon_port=self.mon_port, rgw_port=self.rgw_port, root=self.root))
        keyring = self.root / "keyring"
        subprocess.run(["ceph-authtool", "--create-keyring", str(keyring), "--gen-key", "-n", "mon.",
                        "--cap", "mon", "allow *"], check=True, capture_output=True)  # fmt: skip
        monmap = self.root / "monmap"
        subprocess.run(["monmaptool", "--create", "--fsid", fsid, "--addv", "a", f"[v1:127.0.0.1:{self.mon_port}]",
                        str(monmap)], check=True, capture_output=True)  # fmt: skip
        self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(monmap), "--keyring", str(keyring))
        self._run("ceph-mon", "-i", "a")
        osd_uuid = str(uuid.uuid4())
        self._run("ceph", "osd", "create", osd_uuid, timeout=timeout)
        self._run("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
        for attempt in range(5):  # a fresh monitor sometimes refuses the OSD's first hello ('wrong fsid')
            try:
                self._run("ceph-osd", "-i", "0")
                break
            except RuntimeError:
                if attempt == 4:
                    raise
                time.sleep(1 + attempt)
        self._run("radosgw", "-n", "client.rgw")
        self._run("radosgw-admin", "user", "create", "--uid", "oneword-test", "--display-name", "oneword tests",
                  "--access-key", ACCESS_KEY, "--secret", SECRET_KEY, timeout=timeout)  # fmt: skip
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while True:
            try:
                urllib.request.urlopen(f"http://{self.endpoint}/", timeout=2).read()
                return
            except urllib.error.HTTPError:
                return  # an S3 error response (e.g. 403) means the gateway is serving
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"radosgw did not answer on {self.endpoint}") from None  # the log tails follow
                time.sleep(0.3)

    def _pid(self, name: str) -> int | None:
        try:
            return int((self.root / "run" / f"{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def _kill(self, name: str, sig: int = signal.SIGTERM, wait: float = 20) -> None:
        pid = self._pid(name)
        if pid is None:
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def stop_gateway(self) -> None:
        """Stops radosgw only (a fault: 'the S3 server is down'); ``start_gateway`` brings it back."""
        self._kill("client.rgw")

    def start_gateway(self) -> None:
        """Starts radosgw again (a no-op while it runs); returns once it answers."""
        if not self._alive("client.rgw"):
            self._run("radosgw", "-n", "client.rgw")
        self._wait_ready(60)

    def _alive(self, name: str) -> bool:
        pid = self._pid(name)
        try:
            return pid is not None and os.kill(pid, 0) is None
        except ProcessLookupError:
            return False

    def stop(self) -> None:
        for name in ("client.rgw", "osd.0", "mon.a"):
            self._kill(name)
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def s3_bucket_on_loopback(root: Path, bucket: str) -> Iterator[CephRGW]:
    """A running server holding an empty ``bucket``, its settings in this process's environment
    (what benchmarks need); stopped and removed afterwards."""
    from pipeline.store.storage import S3Settings

    server = CephRGW(root).start()
    try:
        os.environ.update(server.env)
        S3Settings.from_env(server.env).client().make_bucket(bucket_name=bucket)
        yield server
    finally:
        server.stop()


def main() -> None:
    server = CephRGW(Path(tempfile.mkdtemp(prefix="oneword-rgw-"))).start()
    for key, value in server.env.items():
        print(f"export {key}={value}")
    print("# Ctrl-C stops the server", file=sys.stderr)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
