"""Base models kept in object storage: ``s3://bucket/models/sd15/`` becomes a local folder, once.

The first use downloads every object under the prefix into ``$ONEWORD_CACHE/models`` (default
``~/.cache/oneword/models``), checks each file's size and, where the server's ETag is a plain MD5
(single-part uploads), its MD5; only a complete, verified copy is renamed into place. A file
lock makes two processes that start at once share one download. A changed remote folder (other
sizes or ETags) gets a new cache entry, so a running process never sees files change under it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

from pipeline.errors import InputError, StorageError
from pipeline.store.storage import ObjectInfo, ObjectNotFoundError, Storage, open_storage

COMPLETE = ".oneword-complete.json"
_MD5_ETAG = re.compile(r"^[0-9a-f]{32}$")


def cache_root() -> Path:
    return Path(os.environ.get("ONEWORD_CACHE", "~/.cache/oneword")).expanduser() / "models"


def _fingerprint(objects: list[ObjectInfo]) -> str:
    listing = [(o.key, o.size, o.etag) for o in objects]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]


def _file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _download_verified(storage: Storage, objects: list[ObjectInfo], folder: Path) -> None:
    for info in objects:
        path = folder / info.key
        storage.download(info.key, path)
        size = path.stat().st_size
        if size != info.size:
            raise StorageError(f"{storage.location}/{info.key}: downloaded {size} bytes, the server listed {info.size}")
        if info.etag and _MD5_ETAG.match(info.etag) and _file_md5(path) != info.etag:
            raise StorageError(f"{storage.location}/{info.key}: download does not match the server's MD5 (ETag)")


def fetch_model(location: str, cache: Path | None = None) -> tuple[Path, bool]:
    """The local folder holding the model at ``location``, and whether this call downloaded it."""
    storage = open_storage(location)
    objects = [o for o in storage.list("") if not o.key.endswith("/")]
    if not any(o.key == "model_index.json" for o in objects):
        raise InputError(f"{location}: not a diffusers model folder (no model_index.json under it)")
    root = (cache or cache_root()) / hashlib.sha256(location.rstrip("/").encode()).hexdigest()[:16]
    target = root / _fingerprint(objects)
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second process waits here, then finds the copy done
        if (target / COMPLETE).is_file():
            return target, False
        tmp = root / f".partial-{uuid.uuid4().hex}"
        try:
            _download_verified(storage, objects, tmp)
            (tmp / COMPLETE).write_text(json.dumps({"location": location, "files": len(objects)}) + "\n")
            shutil.rmtree(target, ignore_errors=True)  # an earlier, incomplete copy
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target, True


def local_model_source(source: str | Path) -> str:
    """What the engine's ``load_base_model`` takes: an ``s3://`` location becomes its verified local
    copy (downloaded once); a folder, hub id or bundled model name is returned unchanged."""
    if str(source).startswith("s3://"):
        return str(fetch_model(str(source))[0])
    return str(source)


def model_resolution(source: str | Path) -> int:
    """The native image side of a model anywhere ``local_model_source`` takes, reading only its two
    small configs (an ``s3://`` model is not downloaded for this)."""
    from pipeline.engine.model import native_resolution, resolution_from_configs

    if str(source).startswith("s3://"):
        storage = open_storage(str(source))
        try:
            unet, vae = (json.loads(storage.get(f"{part}/config.json")) for part in ("unet", "vae"))
        except ObjectNotFoundError:
            raise InputError(f"{source}: not a diffusers model folder (no unet/ or vae/ config.json)") from None
        except (ValueError, KeyError) as err:
            raise InputError(f"{source}: unreadable unet/vae config ({err})") from None
        return resolution_from_configs(unet, vae)
    return native_resolution(source)
