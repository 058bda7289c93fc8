"""Where oneword keeps bytes: a local folder (the embedded default) or an S3-compatible bucket.

Both backends offer the same five operations on keys ("concepts/my-dog/.../manifest.json"):
``put`` (all or nothing: a reader sees the old object, the new one, or none, never a part),
``get``, ``download`` (to a file, streamed), ``list`` (sorted by key) and ``delete``. Locations are
written ``s3://bucket/prefix`` or as a path; ``open_storage`` turns one into a backend.

S3 settings come from the environment (``ONEWORD_S3_ENDPOINT``, ``ONEWORD_S3_ACCESS_KEY`` /
``AWS_ACCESS_KEY_ID``, ``ONEWORD_S3_SECRET_KEY`` / ``AWS_SECRET_ACCESS_KEY``,
``ONEWORD_S3_REGION``, ``ONEWORD_S3_SECURE``, ``ONEWORD_S3_RETRIES``) or from a YAML/JSON file
named by ``ONEWORD_S3_CONFIG`` (a mounted Kubernetes secret, say) with the same fields in lower
case; the environment wins. Secrets are ``SecretStr`` and never appear in messages.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import urllib3
import yaml
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from pipeline.atomic_files import atomic_write
from pipeline.errors import InputError, StorageError

CREDENTIAL_ERRORS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken"}


class ObjectNotFoundError(StorageError):
    """The key does not exist (at this location)."""


class StorageUnavailableError(StorageError):
    """The server could not be reached or failed (5xx) even after the client's retries: an outage,
    which may pass, unlike a missing bucket or refused credentials."""


OUTAGE_ERRORS = ("InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout")
Result = TypeVar("Result")


def wait_out_outage(call: Callable[[], Result], patience: float, on_wait: Callable[[str], None] = print,
                    on_pause: Callable[[float], None] | None = None) -> Result:  # fmt: skip
    """``call()``, repeated while the storage is unavailable for up to ``patience`` seconds.

    For work that is expensive to lose (a bulk job's trained concepts): the client's own retries
    cover a blip of seconds; this covers a restart of the object store. Other errors are raised
    at once. ``on_wait`` hears one line per wait, without credentials (the errors carry none);
    ``on_pause`` the seconds of each pause (metrics).
    """
    deadline = time.monotonic() + patience
    pause = 1.0
    while True:
        try:
            return call()
        except StorageUnavailableError as err:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            on_wait(f"{err}; trying again in {min(pause, left):.0f} s (waiting up to {patience:.0f} s in all)")
            time.sleep(min(pause, left))
            if on_pause is not None:
                on_pause(min(pause, left))
            pause = min(pause * 2, 30.0)


@dataclass(frozen=True)
class ObjectInfo:
    key: str  # relative to the storage's prefix
    size: int
    etag: str | None = None  # S3's ETag (an MD5 for single-part uploads); None for folders


class Storage(Protocol):
    """The five operations every backend has; ``location`` is printable (no credentials)."""

    location: str

    def put(self, key: str, data: bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def download(self, key: str, path: Path) -> None: ...
    def list(self, prefix: str = "", start_after: str = "") -> Iterator[ObjectInfo]: ...
    def delete(self, key: str) -> None: ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise InputError(f"invalid storage key {key!r}")
    return key


# --- local folder ---------------------------------------------------------------------------------


class LocalStorage:
    """A folder. Temporary files (a leading '.') are invisible to ``list``."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().absolute()
        self.location = str(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise StorageError(f"{self.root}: exists and is not a folder")

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put(self, key: str, data: bytes) -> None:
        try:
            atomic_write(self._path(key), lambda tmp: tmp.write_bytes(data))
        except OSError as err:
            raise StorageError(f"{self._path(key)}: cannot write ({err.strerror})") from None

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFoundError(f"{path}: not found") from None
        except OSError as err:
            raise StorageError(f"{path}: cannot read ({err.strerror})") from None

    def download(self, key: str, path: Path) -> None:
        atomic_write(Path(path), lambda tmp: tmp.write_bytes(self.get(key)))

    def list(self, prefix: str = "", start_after: str = "") -> Iterator[ObjectInfo]:
        base = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        if not base.is_dir():
            return
        keys = []
        for folder, dirs, files in os.walk(base):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            rel = Path(folder).relative_to(self.root).as_posix()
            for name in files:
                key = name if rel == "." else f"{rel}/{name}"
                if not name.startswith(".") and key.startswith(prefix) and key > start_after:
                    keys.append(key)
        for key in sorted(keys):
            try:
                yield ObjectInfo(key, (self.root / key).stat().st_size)
            except FileNotFoundError:  # deleted since the walk
                continue

    def delete(self, key: str) -> None:
        path = self._path(key)
        path.unlink(missing_ok=True)
        for parent in path.parents:  # drop folders left empty, up to the root
            if parent == self.root or not parent.is_relative_to(self.root):
                break
            try:
                parent.rmdir()
            except OSError:
                break


# --- S3-compatible --------------------------------------------------------------------------------


class S3Settings(BaseModel):
    """How to reach an S3-compatible endpoint (MinIO, Ceph RGW, AWS S3)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoint: str = Field("s3.amazonaws.com", description="host[:port]; an http:// prefix turns TLS off")
    access_key: SecretStr | None = None
    secret_key: SecretStr | None = None
    region: str = Field("us-east-1", description="servers other than AWS accept us-east-1")
    secure: bool = Field(True, description="TLS on or off")
    retries: int = Field(5, ge=0, le=20, description="retries of a failed request, with backoff")
    timeout: float = Field(30.0, gt=0, description="seconds to wait for a connection or a response")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> S3Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        config_file = env.get("ONEWORD_S3_CONFIG")
        if config_file:
            values.update(_read_settings_file(Path(config_file)))
        names = {
            "endpoint": ("ONEWORD_S3_ENDPOINT",),
            "access_key": ("ONEWORD_S3_ACCESS_KEY", "AWS_ACCESS_KEY_ID"),
            "secret_key": ("ONEWORD_S3_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"),
            "region": ("ONEWORD_S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"),
            "secure": ("ONEWORD_S3_SECURE",),
            "retries": ("ONEWORD_S3_RETRIES",),
            "timeout": ("ONEWORD_S3_TIMEOUT",),
        }
        for field, variables in names.items():
            for variable in variables:
                if env.get(variable):
                    values[field] = env[variable]
                    break
        endpoint = str(values.get("endpoint", ""))
        for scheme, secure in (("http://", False), ("https://", True)):
            if endpoint.startswith(scheme):
                values["endpoint"], values["secure"] = endpoint.removeprefix(scheme).rstrip("/"), secure
        try:
            return cls(**values)
        except ValidationError as err:  # name the field, never echo the value (it may be a secret)
            fields = ", ".join(".".join(str(p) for p in e["loc"]) + f" ({e['msg']})" for e in err.errors())
            raise InputError(f"S3 settings (environment / ONEWORD_S3_CONFIG): invalid {fields}") from None

    @property
    def url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.endpoint}"

    def credentials(self) -> tuple[str | None, str | None]:
        """(access key, secret key) in clear, for the clients that need them; never log these."""
        reveal = lambda value: value.get_secret_value() if value is not None else None  # noqa: E731
        return reveal(self.access_key), reveal(self.secret_key)

    def client(self) -> Minio:
        http = urllib3.PoolManager(
            num_pools=4,
            maxsize=16,
            timeout=urllib3.Timeout(connect=min(self.timeout, 10.0), read=self.timeout),
            retries=urllib3.Retry(
                total=self.retries,
                backoff_factor=0.5,
                status_forcelist=(500, 502, 503, 504),
                allowed_methods=None,  # every method: uploads are idempotent puts of whole objects
                raise_on_status=False,
            ),
        )
        access_key, secret_key = self.credentials()
        return Minio(
            endpoint=self.endpoint,
            access_key=access_key,
            secret_key=secret_key,
            region=self.region,
            secure=self.secure,
            http_client=http,
        )


def _read_settings_file(path: Path) -> dict[str, object]:
    try:
        data = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as err:
        raise InputError(f"{path} (ONEWORD_S3_CONFIG): cannot read S3 settings: {type(err).__name__}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path} (ONEWORD_S3_CONFIG): expected a mapping of S3 settings")
    return data


class S3Storage:
    """A bucket and key prefix on an S3-compatible server, through the ``minio`` client."""

    def __init__(self, bucket: str, prefix: str = "", settings: S3Settings | None = None):
        self.settings = settings or S3Settings.from_env()
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.location = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.client = self.settings.client()

    def _object(self, key: str) -> str:
        return f"{self.prefix}/{_check_key(key)}" if self.prefix else _check_key(key)

    @contextmanager
    def _errors(self, action: str, key: str = ""):
        """Turns client and network failures into one-line errors that name the location."""
        where = f"{self.location}/{key}".rstrip("/")
        try:
            yield
        except S3Error as err:
            if err.code in ("NoSuchKey", "NoSuchObject"):
                raise ObjectNotFoundError(f"{where}: not found") from None
            if err.code == "NoSuchBucket":
                raise StorageError(f"bucket {self.bucket!r} does not exist on {self.settings.url}") from None
            if err.code in CREDENTIAL_ERRORS:
                raise StorageError(
                    f"{self.settings.url} refused the credentials ({err.code}) while {action} {where}; check "
                    "ONEWORD_S3_ACCESS_KEY / ONEWORD_S3_SECRET_KEY (or ONEWORD_S3_CONFIG)"
                ) from None
            if err.code in OUTAGE_ERRORS:
                raise StorageUnavailableError(f"{self.settings.url}: {err.code} while {action} {where}") from None
            raise StorageError(f"{self.settings.url}: {err.code} while {action} {where}") from None
        except (ServerError, InvalidResponseError) as err:
            raise StorageUnavailableError(f"{self.settings.url}: bad response while {action} {where} ({err})") from None
        except urllib3.exceptions.HTTPError as err:
            reason = getattr(err, "reason", None) or err
            raise StorageUnavailableError(
                f"cannot reach S3 endpoint {self.settings.url} while {action} {where} "
                f"(after {self.settings.retries} retries): {type(reason).__name__}"
            ) from None

    def put(self, key: str, data: bytes) -> None:
        import io

        with self._errors("writing", key):
            self.client.put_object(bucket_name=self.bucket, object_name=self._object(key),
                                   data=io.BytesIO(data), length=len(data))  # fmt: skip

    def get(self, key: str) -> bytes:
        with self._errors("reading", key):
            response = self.client.get_object(bucket_name=self.bucket, object_name=self._object(key))
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    def download(self, key: str, path: Path) -> None:
        def fetch(tmp: Path) -> None:
            with self._errors("downloading", key):
                self.client.fget_object(bucket_name=self.bucket, object_name=self._object(key), file_path=str(tmp))

        atomic_write(Path(path), fetch)

    def list(self, prefix: str = "", start_after: str = "") -> Iterator[ObjectInfo]:
        base = f"{self.prefix}/" if self.prefix else ""
        with self._errors("listing", prefix):
            objects = self.client.list_objects(
                bucket_name=self.bucket,
                prefix=base + prefix,
                recursive=True,
                start_after=base + start_after if start_after else None,
            )
            for item in objects:
                etag = (item.etag or "").strip('"') or None
                yield ObjectInfo(item.object_name.removeprefix(base), int(item.size or 0), etag)

    def delete(self, key: str) -> None:
        with self._errors("deleting", key):
            self.client.remove_object(bucket_name=self.bucket, object_name=self._object(key))


# --- locations ------------------------------------------------------------------------------------


def parse_s3_location(location: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` -> (bucket, prefix), with the bucket name checked."""
    rest = location.removeprefix("s3://")
    bucket, _, prefix = rest.partition("/")
    if not (3 <= len(bucket) <= 63) or not all(c.islower() or c.isdigit() or c in ".-" for c in bucket):
        raise InputError(f"{location}: invalid bucket name {bucket!r} (3-63 characters: a-z, 0-9, '.', '-')")
    if any(part in (".", "..") for part in prefix.split("/")):
        raise InputError(f"{location}: '.' and '..' are not allowed in the prefix")
    return bucket, prefix.strip("/")


def open_storage(location: str | Path, settings: S3Settings | None = None) -> Storage:
    """``s3://bucket/prefix`` -> ``S3Storage``; anything else is a local folder."""
    text = str(location)
    if text.startswith("s3://"):
        bucket, prefix = parse_s3_location(text)
        return S3Storage(bucket, prefix, settings)
    if "://" in text:
        raise InputError(f"{text}: unsupported location (use s3://bucket/prefix or a folder path)")
    return LocalStorage(text)
