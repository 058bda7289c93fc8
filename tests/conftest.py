"""Shared fixtures: one tiny model, one set of concept images, one S3 server and one Ray head
per test session.

The whole session runs in a loopback-only network namespace: Ray listens on every interface
and advertises the machine's address, so pytest re-executes itself under ``unshare -n`` (with
``lo`` up) before anything starts. Everything the tests start then lives on 127.0.0.1 of that
namespace, which nothing outside can reach and from which nothing outside is reachable.
"""

from __future__ import annotations

import atexit
import io
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests never touch the user's default registry or model cache.
os.environ["ONEWORD_REGISTRY"] = os.path.join(tempfile.mkdtemp(prefix="oneword-test-registry-"), "registry")
os.environ["ONEWORD_CACHE"] = tempfile.mkdtemp(prefix="oneword-test-cache-")

from pathlib import Path

import pytest
import torch

from pipeline.engine.config import InversionConfig
from pipeline.engine.data import load_images
from pipeline.engine.model import TINY_TEXT_CONFIG, BaseModel, build_tiny_model, load_base_model
from pipeline.shapesworld.world import write_concept_images


def remove_scratch_dirs() -> None:
    """Removes this process's registry and cache folders (made above, one pair per process)."""
    for path in (Path(os.environ["ONEWORD_REGISTRY"]).parent, os.environ["ONEWORD_CACHE"]):
        shutil.rmtree(path, ignore_errors=True)


atexit.register(remove_scratch_dirs)

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two xdist workers share the two cores with the Ray head's processes: one torch thread each
    # (their subprocesses too), so a pure-torch test never starves the Ray test beside it.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_configure(config) -> None:
    """Re-executes this pytest run inside a loopback-only network namespace (see the docstring)."""
    from tests.netns import isolated, reexec_isolated

    if isolated():
        return
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.stop_global_capturing()  # hand the real stdout/stderr to the new process
    reexec_isolated([sys.executable, "-m", "pytest", *sys.argv[1:]], before_exec=remove_scratch_dirs)


SERVICE_FIXTURES = {"s3_server", "ray_head"}  # session-wide servers; every other fixture is per worker


def uses_services(item: pytest.Item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return bool(SERVICE_FIXTURES & set(getattr(item, "fixturenames", ()))) or params.get("storage_location") == "s3"


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items: list[pytest.Item]) -> None:
    """Schedules the suite for two xdist workers (``-n 2 --dist loadgroup`` in pyproject.toml).

    The tests that use the S3 server or the Ray head form one group, which one worker runs in
    order, so a run starts one server of each and no two tests share the Ray head's two CPUs.
    The other worker runs the rest, the ``heavy`` ones first so that none of them is left to
    end the run. Without xdist the same order holds and the group is just a marker."""
    for item in items:
        if uses_services(item):
            item.add_marker(pytest.mark.xdist_group("services"))
    items.sort(key=lambda item: (not uses_services(item), item.get_closest_marker("heavy") is None))


@pytest.fixture(autouse=True)
def _yield_to_services(request) -> None:
    """Under xdist, a worker that runs a test without the servers steps back for the rest of its
    life (Linux's SCHED_IDLE: it runs when a core would otherwise idle): the services' worker and
    the Ray processes it drives wait on each other's start-ups, so they keep the cores they ask
    for, and the heavy pure-torch tests fill the gaps between."""
    if os.environ.get("PYTEST_XDIST_WORKER") and not uses_services(request.node):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture(scope="session")
def vpred_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-vpred"), seed=1, prediction_type="v_prediction")


@pytest.fixture
def model(tiny_model_dir) -> BaseModel:
    """A fresh load per test: tests may check that weights are untouched."""
    return load_base_model(tiny_model_dir, "cpu")


@pytest.fixture(scope="session")
def star_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("star")
    write_concept_images(out, "star", "yellow", count=5, size=64, seed=0)
    return out


@pytest.fixture(scope="session")
def star_images(star_dir) -> torch.Tensor:
    return load_images(star_dir, 64)


DIM = TINY_TEXT_CONFIG["hidden_size"]  # the tiny model's embedding width


def roundtrip(state: dict) -> dict:
    """Through bytes and back, as a checkpoint file would go (tensor-only loading)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def small_config(**overrides) -> InversionConfig:
    values = dict(steps=20, batch_size=2, learning_rate=5e-3, init_word="shape", seed=3, checkpoint_interval=5)
    values.update(overrides)
    return InversionConfig(**values)


# --- object storage: one real S3 server (Ceph RGW on 127.0.0.1) per test session ----------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    from tests.ceph_rgw import CephRGW

    server = CephRGW(tmp_path_factory.mktemp("ceph-rgw")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_settings(s3_server):
    from pipeline.store.storage import S3Settings

    return S3Settings.from_env({**s3_server.env, "ONEWORD_S3_RETRIES": "2"})


_bucket_counter = iter(range(1_000_000))


@pytest.fixture
def s3_bucket(s3_settings) -> str:
    """A new, empty bucket for one test."""
    name = f"test-{os.getpid()}-{next(_bucket_counter)}"
    s3_settings.client().make_bucket(bucket_name=name)
    return name


@pytest.fixture
def s3_env(s3_server, monkeypatch) -> dict[str, str]:
    """The server's settings in this process's environment (for the CLI and subprocesses)."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("ONEWORD_S3_RETRIES", "2")
    return dict(s3_server.env)


@pytest.fixture(params=["folder", "s3"])
def storage_location(request, tmp_path) -> str:
    """The same registry tests against both backends: a folder, and a prefix in a real bucket."""
    if request.param == "folder":
        return str(tmp_path / "registry")
    bucket = request.getfixturevalue("s3_bucket")
    request.getfixturevalue("s3_env")
    return f"s3://{bucket}/registry"


# --- Ray: one head node per test session, with the S3 server's settings in its environment -------


@dataclass
class RayHead:
    jobs_api: str  # http://127.0.0.1:PORT
    client: str  # ray://127.0.0.1:PORT
    gcs: str  # 127.0.0.1:PORT, for ray.init(address=...)
    env: dict[str, str]
    metrics: str  # http://127.0.0.1:PORT/metrics: the node's Prometheus endpoint (Ray's and oneword's)


@pytest.fixture(scope="session")
def ray_head(s3_server, tmp_path_factory):
    """A head with token authentication on (Ray's future default): every client must send the token."""
    import secrets

    from tests.ceph_rgw import free_ports
    from tests.prometheus import REPORT_INTERVAL_S

    token_file = tmp_path_factory.mktemp("ray-auth") / "token"
    token_file.write_text(secrets.token_hex(16))
    venv_bin = os.path.dirname(sys.executable)
    # Ray Train's controllers poll their workers every 0.5 s instead of 2 s: a run's end (and a
    # killed worker) is seen sooner, in each of the suite's few dozen tiny runs; and no run starts
    # a preemption watcher actor, since one local node is never preempted
    env = {**os.environ, **s3_server.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file),
           "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
           "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0", "RAY_metrics_report_interval_ms": str(REPORT_INTERVAL_S * 1000),
           "PATH": f"{venv_bin}:{os.environ['PATH']}"}  # fmt: skip
    dashboard, client, gcs, metrics = free_ports(4)
    started = subprocess.run([os.path.join(venv_bin, "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
                    f"--port={gcs}", "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                    f"--ray-client-server-port={client}", f"--metrics-export-port={metrics}", "--disable-usage-stats"],
                   env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    if started.returncode != 0:
        raise RuntimeError(f"ray start failed ({started.returncode}): {started.stdout[-2000:]}{started.stderr[-3000:]}")
    try:
        yield RayHead(
            f"http://127.0.0.1:{dashboard}",
            f"ray://127.0.0.1:{client}",
            f"127.0.0.1:{gcs}",
            env,
            f"http://127.0.0.1:{metrics}/metrics",
        )
    finally:
        subprocess.run([os.path.join(venv_bin, "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
