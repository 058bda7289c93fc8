"""The concept registry, against a folder and against a real S3 server (Ceph RGW on 127.0.0.1)."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import threading
from datetime import timedelta

import pytest
import torch
from pydantic import SecretStr

from pipeline.engine.concepts import NAME_RULE, InvalidNameError
from pipeline.engine.formats import LearnedConcept
from pipeline.errors import InputError, StorageError
from pipeline.store.registry import (
    ARTIFACT,
    MANIFEST,
    MAX_PREVIEW_BYTES,
    PNG_SIGNATURE,
    PREVIEW,
    ConceptNotFoundError,
    CorruptConceptError,
    NoPreviewError,
    Registry,
    new_version,
)
from pipeline.store.storage import (
    LocalStorage,
    ObjectNotFoundError,
    S3Settings,
    S3Storage,
    StorageUnavailableError,
    open_storage,
    wait_out_outage,
)


def concept(name: str, fill: float, n: int = 2, dim: int = 8, base_model: str | None = "clip-test") -> LearnedConcept:
    return LearnedConcept(name=name, vectors=torch.full((n, dim), fill), base_model=base_model, steps=10,
                          config={"steps": 10}, final_loss=0.25)  # fmt: skip


def stored_keys(location: str) -> list[str]:
    return [info.key for info in open_storage(location).list("")]


def test_publish_then_get_latest_and_pinned(storage_location):
    registry = Registry.open(storage_location)
    first = registry.publish(concept("my-dog", 1.0), metrics={"final_loss": 0.5}, job_id="job-1")
    second = registry.publish(concept("my-dog", 2.0, n=3))

    assert registry.versions("my-dog") == [first.version, second.version]
    assert first.version < second.version  # time-ordered ids
    latest_manifest, latest = registry.get("my-dog")
    assert latest_manifest == second
    assert torch.equal(latest.vectors, torch.full((3, 8), 2.0))
    pinned_manifest, pinned = registry.get("my-dog", first.version)
    assert torch.equal(pinned.vectors, torch.full((2, 8), 1.0))
    assert pinned_manifest.job_id == "job-1" and pinned_manifest.metrics == {"final_loss": 0.5}
    assert (pinned_manifest.name, pinned_manifest.placeholder, pinned_manifest.num_vectors, pinned_manifest.dim) == (
        "my-dog", "<my-dog>", 2, 8)  # fmt: skip
    assert pinned_manifest.base_model == "clip-test" and pinned_manifest.config == {"steps": 10}
    artifact = open_storage(storage_location).get(f"concepts/my-dog/{first.version}/{ARTIFACT}")
    assert pinned_manifest.sha256 == hashlib.sha256(artifact).hexdigest() and pinned_manifest.size == len(artifact)


def test_list_filters_by_prefix_and_pages(storage_location):
    registry = Registry.open(storage_location)
    published = [registry.publish(concept(name, float(i))) for i, name in enumerate(["cat-a", "cat-b", "cat-a", "dog"])]
    expected = sorted(m.ref for m in published if m.name.startswith("cat"))

    seen, after, pages = [], None, 0
    while True:
        page = registry.list("cat", limit=2, after=after)
        seen += [m.ref for m in page.manifests]
        pages += 1
        if page.next_after is None:
            break
        after = page.next_after
    assert seen == expected and pages == 2
    assert [m.name for m in registry.list().manifests] == ["cat-a", "cat-a", "cat-b", "dog"]
    assert list(registry.names()) == ["cat-a", "cat-b", "dog"]


def test_delete_removes_one_version(storage_location):
    registry = Registry.open(storage_location)
    old = registry.publish(concept("my-dog", 1.0))
    new = registry.publish(concept("my-dog", 2.0))
    registry.delete("my-dog", new.version)
    with pytest.raises(ConceptNotFoundError, match=new.version):
        registry.get("my-dog", new.version)
    assert registry.get("my-dog")[0] == old
    assert not any(new.version in key for key in stored_keys(storage_location))


def png(colour: tuple[int, int, int], size: int = 16) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_preview_is_kept_checked_attached_once_and_deleted_with_its_version(storage_location):
    registry = Registry.open(storage_location)
    red, blue = png((255, 0, 0)), png((0, 0, 255))
    with_preview = registry.publish(concept("my-dog", 1.0), preview=red)
    assert (with_preview.preview_sha256, with_preview.preview_size) == (hashlib.sha256(red).hexdigest(), len(red))
    assert registry.preview("my-dog") == (with_preview, red)

    # a version without one (an imported file) gets one later; its vectors and the rest stay
    plain = registry.publish(concept("my-cat", 2.0))
    stored = open_storage(storage_location).get(f"concepts/my-cat/{plain.version}/{MANIFEST}").decode()
    assert "preview_sha256" not in stored  # manifests without a preview are as before
    with pytest.raises(NoPreviewError, match="has no preview image"):
        registry.preview("my-cat")
    attached = registry.attach_preview("my-cat", plain.version, blue)
    assert registry.manifest("my-cat") == attached
    assert attached.model_dump(exclude={"preview_sha256", "preview_size"}) == plain.model_dump(
        exclude={"preview_sha256", "preview_size"})  # fmt: skip
    assert registry.preview("my-cat", plain.version)[1] == blue
    with pytest.raises(InputError, match="already has a preview"):
        registry.attach_preview("my-cat", plain.version, red)
    assert registry.preview("my-cat")[1] == blue

    # altered in storage: detected, like the artifact
    open_storage(storage_location).put(f"concepts/my-dog/{with_preview.version}/{PREVIEW}", blue)
    with pytest.raises(CorruptConceptError, match="checksum mismatch"):
        registry.preview("my-dog")
    registry.delete("my-dog", with_preview.version)
    assert not any(with_preview.version in key for key in stored_keys(storage_location))


def test_a_preview_must_be_a_small_png_and_a_refused_one_stores_nothing(tmp_path):
    registry = Registry.open(str(tmp_path / "registry"))
    for bad, message in ((b"GIF89a....", "not a PNG image"),
                         (PNG_SIGNATURE + bytes(MAX_PREVIEW_BYTES), "over the limit")):  # fmt: skip
        with pytest.raises(InputError, match=message):
            registry.publish(concept("my-dog", 1.0), preview=bad)
    assert stored_keys(str(tmp_path / "registry")) == []
    manifest = registry.publish(concept("my-dog", 1.0))
    with pytest.raises(InputError, match="not a PNG image"):
        registry.attach_preview("my-dog", manifest.version, b"<svg/>")
    assert registry.manifest("my-dog") == manifest


def test_unknown_concept_and_version(storage_location):
    registry = Registry.open(storage_location)
    with pytest.raises(ConceptNotFoundError, match="no concept named 'ghost'"):
        registry.get("ghost")
    registry.publish(concept("real", 1.0))
    with pytest.raises(ConceptNotFoundError, match="no version"):
        registry.get("real", new_version())


@pytest.mark.parametrize("bad", ["../x", "a/b", "a b", "", "MyDog", "ｍy-dog", "mу-dog", "x" * 65, "dog\n", ".."])
def test_invalid_names_refused_with_the_rule_and_nothing_stored(tmp_path, bad):
    location = str(tmp_path / "registry")
    registry = Registry.open(location)
    with pytest.raises(InvalidNameError) as info:
        registry.publish(_unchecked(bad))
    assert NAME_RULE in str(info.value)
    with pytest.raises(InvalidNameError, match="1-64 characters"):
        registry.get(bad)
    assert stored_keys(location) == []


def _unchecked(name: str) -> LearnedConcept:
    """A concept object carrying an invalid name (as a caller's bug or a crafted import would)."""
    valid = concept("placeholder", 1.0)
    valid.name = name
    return valid


def test_artifact_altered_in_storage_is_detected(storage_location):
    registry = Registry.open(storage_location)
    manifest = registry.publish(concept("my-dog", 1.0))
    storage = open_storage(storage_location)
    key = f"concepts/my-dog/{manifest.version}/{ARTIFACT}"
    tampered = registry.publish(concept("other", 9.0))  # a valid file, but not this version's
    storage.put(key, storage.get(f"concepts/other/{tampered.version}/{ARTIFACT}"))
    with pytest.raises(CorruptConceptError, match="checksum mismatch"):
        registry.get("my-dog")
    storage.put(key, b"garbage")
    with pytest.raises(CorruptConceptError, match="checksum mismatch"):
        registry.get("my-dog", manifest.version)


def test_interrupted_publish_is_invisible_and_collected(storage_location):
    registry = Registry.open(storage_location)
    committed = registry.publish(concept("my-dog", 1.0))
    # The state a publish leaves when killed between its two writes: an artifact, no manifest.
    storage = open_storage(storage_location)
    orphan = new_version()
    storage.put(f"concepts/my-dog/{orphan}/{ARTIFACT}", b"partial")
    assert registry.versions("my-dog") == [committed.version]
    assert registry.get("my-dog")[0] == committed
    assert [m.ref for m in registry.list().manifests] == [committed.ref]
    assert registry.gc(older_than=timedelta(hours=1)) == []  # young leftovers may be mid-publish
    assert registry.gc(older_than=timedelta(0)) == [f"concepts/my-dog/{orphan}/{ARTIFACT}"]
    assert stored_keys(storage_location) == [
        f"concepts/my-dog/{committed.version}/{n}" for n in (ARTIFACT, "manifest.json")
    ]


class FailingManifestWrites:
    """Fault injection: the storage accepts the artifact and then fails (as a dropped connection would)."""

    def __init__(self, storage):
        self.inner, self.location = storage, storage.location

    def put(self, key, data):
        if key.endswith("manifest.json"):
            raise StorageError("connection lost")
        self.inner.put(key, data)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_failed_publish_leaves_nothing(storage_location):
    registry = Registry(FailingManifestWrites(open_storage(storage_location)))
    with pytest.raises(StorageError, match="connection lost"):
        registry.publish(concept("my-dog", 1.0))
    assert stored_keys(storage_location) == []


def _publish_many(location: str, env: dict[str, str], worker: int, count: int, queue) -> None:
    os.environ.update(env)
    registry = Registry.open(location)
    for i in range(count):
        value = float(worker * 100 + i)
        queue.put((registry.publish(concept("shared", value)).version, value))


def test_concurrent_publishers_threads_and_processes(storage_location):
    env = {k: v for k, v in os.environ.items() if k.startswith("ONEWORD_S3_")}
    spawn = multiprocessing.get_context("spawn")
    queue = spawn.Queue()
    processes = [spawn.Process(target=_publish_many, args=(storage_location, env, w, 3, queue)) for w in range(3)]
    for p in processes:
        p.start()
    results: list[tuple[str, float]] = []
    lock = threading.Lock()

    def publish_in_thread(worker: int) -> None:
        registry = Registry.open(storage_location)
        for i in range(3):
            value = float(worker * 100 + i)
            version = registry.publish(concept("shared", value)).version
            with lock:
                results.append((version, value))

    threads = [threading.Thread(target=publish_in_thread, args=(w,)) for w in range(10, 16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in processes:
        p.join(timeout=120)
        assert p.exitcode == 0
    results += [queue.get(timeout=5) for _ in range(9)]

    registry = Registry.open(storage_location)
    assert len(results) == 27 and len({v for v, _ in results}) == 27
    assert registry.versions("shared") == sorted(v for v, _ in results)
    for version, value in results:  # every version intact and its own
        assert torch.equal(registry.get("shared", version)[1].vectors, torch.full((2, 8), value))


# --- S3-specific faults ---------------------------------------------------------------------------


def test_s3_unreachable_endpoint_is_a_clear_error(tmp_path):
    from tests.ceph_rgw import free_port

    settings = S3Settings(endpoint=f"127.0.0.1:{free_port()}", secure=False, retries=0, timeout=2,
                          access_key="ak", secret_key="sk-very-secret")  # fmt: skip
    registry = Registry(S3Storage("concepts", "x", settings))
    with pytest.raises(StorageError, match=r"cannot reach S3 endpoint http://127\.0\.0\.1:\d+") as info:
        registry.publish(concept("my-dog", 1.0))
    assert "sk-very-secret" not in str(info.value)


def test_waiting_out_an_s3_outage(s3_server, s3_settings, s3_bucket):
    """Outages are waited out for the patience given, then raised; other errors are raised at once."""
    storage = S3Storage(s3_bucket, "patience", s3_settings)
    storage.put("a.json", b"{}")
    waits: list[str] = []
    comeback = threading.Timer(0, lambda: None)
    s3_server.stop_gateway()
    try:
        with pytest.raises(StorageUnavailableError, match="cannot reach S3 endpoint"):
            wait_out_outage(lambda: storage.get("a.json"), patience=2, on_wait=waits.append)
        assert waits and all("waiting up to 2 s" in line for line in waits)
        assert not any(s3_settings.secret_key.get_secret_value() in line for line in waits)
        comeback = threading.Timer(3, s3_server.start_gateway)  # back while the next call is waiting
        comeback.start()
        assert wait_out_outage(lambda: storage.get("a.json"), patience=120, on_wait=waits.append) == b"{}"
    finally:
        comeback.cancel()
        comeback.join()
        s3_server.start_gateway()  # a no-op when it is already back
    waits.clear()
    with pytest.raises(ObjectNotFoundError):
        wait_out_outage(lambda: storage.get("missing.json"), patience=120, on_wait=waits.append)
    assert waits == []  # a missing object is not an outage: no waiting


def test_s3_wrong_credentials_and_missing_bucket(s3_server, s3_settings, s3_bucket):
    wrong = s3_settings.model_copy(update={"secret_key": SecretStr("wrong-secret-value")})
    registry = Registry(S3Storage(s3_bucket, "reg", wrong))
    with pytest.raises(StorageError, match="refused the credentials") as info:
        registry.publish(concept("my-dog", 1.0))
    message = str(info.value)
    assert "wrong-secret-value" not in message and s3_settings.secret_key.get_secret_value() not in message
    assert list(S3Storage(s3_bucket, "", s3_settings).list("")) == []  # nothing half-published

    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        Registry(S3Storage("no-such-bucket", "", s3_settings)).publish(concept("my-dog", 1.0))
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist"):
        Registry(S3Storage("no-such-bucket", "", s3_settings)).get("my-dog")


def test_s3_settings_from_env_and_file(tmp_path):
    config = tmp_path / "s3.yaml"
    config.write_text("endpoint: https://s3.example.internal:9000\naccess_key: from-file\nsecret_key: file-secret\n")
    settings = S3Settings.from_env({"ONEWORD_S3_CONFIG": str(config), "AWS_ACCESS_KEY_ID": "from-env"})
    assert (settings.endpoint, settings.secure) == ("s3.example.internal:9000", True)
    assert settings.access_key.get_secret_value() == "from-env"  # the environment wins over the file
    assert "file-secret" not in repr(settings) and "file-secret" not in str(settings.model_dump())
    with pytest.raises(Exception, match="retries") as info:
        S3Settings.from_env({"ONEWORD_S3_RETRIES": "many", "ONEWORD_S3_SECRET_KEY": "hidden-one"})
    assert "hidden-one" not in str(info.value)


def test_local_storage_is_atomic_and_hides_temporaries(tmp_path):
    storage = LocalStorage(tmp_path)
    storage.put("a/b.bin", b"one")
    (tmp_path / "a" / ".b.bin.123.tmp").write_bytes(b"half")  # a writer killed mid-write
    assert [i.key for i in storage.list("")] == ["a/b.bin"]
    with pytest.raises(Exception, match="invalid storage key"):
        storage.put("../escape", b"x")
