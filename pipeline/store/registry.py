"""The concept registry: immutable, versioned concepts in a ``Storage`` (folder or S3 bucket).

Layout under the registry's location::

    concepts/<name>/<version>/learned_embeds.safetensors   the artifact, written first
    concepts/<name>/<version>/preview.png                  an optional preview image, written next
    concepts/<name>/<version>/manifest.json                the commit record, written last

A version exists exactly when its manifest does, so a reader never sees a half-published
concept, and a publish interrupted between the two writes leaves only an invisible artifact
(``gc`` removes such leftovers once they are old). Version ids are UTC time plus randomness,
``20261126T122400.123456Z-3f9a1c``: unique and time-ordered with no coordination between writers,
so concurrent publishers of one name never touch each other's keys. Every read checks the
artifact against the manifest's sha256, and a preview against its own.

A preview is the one thing a version may gain later: a concept imported from a file has none
until one is rendered (``attach_preview``), which writes the image and then the manifest again
with the image's checksum; the vectors and everything else about the version stay as they were.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from pipeline.engine.concepts import placeholder, validate_name
from pipeline.engine.formats import LearnedConcept
from pipeline.errors import InputError, StorageError
from pipeline.metrics import LATENCY_BOUNDARIES, histogram
from pipeline.store.storage import ObjectNotFoundError, Storage, open_storage

ROOT = "concepts"
ARTIFACT = "learned_embeds.safetensors"
MANIFEST = "manifest.json"
PREVIEW = "preview.png"
MAX_PREVIEW_BYTES = 1024 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VERSION_RE = re.compile(r"\d{8}T\d{6}\.\d{6}Z-[0-9a-f]{6}")
MANIFEST_FORMAT = 1


class ConceptNotFoundError(InputError):
    """No such concept, or no such version of it."""


class CorruptConceptError(StorageError):
    """Stored bytes that do not match their manifest (altered or damaged in storage)."""


class NoPreviewError(ConceptNotFoundError):
    """The version exists and has no preview image."""


class Manifest(BaseModel):
    """What a registry version is: identity, provenance and the artifact's checksum."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: int = MANIFEST_FORMAT
    name: str
    version: str
    placeholder: str
    num_vectors: int
    dim: int
    base_model: str | None  # text-encoder identity (pipeline.engine.model.text_encoder_identity)
    config: dict[str, Any] | None = None  # the training config, as a plain mapping
    metrics: dict[str, float] = {}
    steps: int | None = None
    source: str = "oneword"
    sha256: str
    size: int
    created_at: datetime
    job_id: str | None = None
    widths: list[int] | None = None  # SDXL: each text encoder's width (LearnedConcept.widths)
    preview_sha256: str | None = None  # the preview image (PREVIEW), when the version has one
    preview_size: int | None = None

    @property
    def architecture(self) -> str:
        return "sdxl" if self.widths else "sd"

    def to_json(self) -> str:
        """The stored form; ``widths`` and the preview's fields only where they are set (readers
        without them keep working)."""
        optional = ("widths", "preview_sha256", "preview_size")
        return self.model_dump_json(indent=2, exclude={f for f in optional if getattr(self, f) is None})

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"


@dataclass(frozen=True)
class Page:
    """One page of ``Registry.list``; pass ``next_after`` back as ``after`` for the next page."""

    manifests: list[Manifest]
    next_after: str | None


def new_version(now: datetime | None = None) -> str:
    now = now or datetime.now(UTC)
    return f"{now.strftime('%Y%m%dT%H%M%S.%f')}Z-{secrets.token_hex(3)}"


def validate_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise InputError(f"invalid version {version!r}: expected e.g. 20261126T122400.123456Z-3f9a1c")
    return version


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``name`` or ``name@version`` (both validated)."""
    name, _, version = ref.partition("@")
    validate_name(name)
    return name, (validate_version(version) if version else None)


def _key(name: str, version: str, leaf: str) -> str:
    return f"{ROOT}/{name}/{version}/{leaf}"


def check_preview(png: bytes, source: str = "preview") -> bytes:
    """A preview must be a PNG image of at most ``MAX_PREVIEW_BYTES``."""
    if not png.startswith(PNG_SIGNATURE):
        raise InputError(f"{source}: not a PNG image")
    if len(png) > MAX_PREVIEW_BYTES:
        raise InputError(f"{source}: {len(png)} bytes, over the limit of {MAX_PREVIEW_BYTES} for a preview")
    return png


def _artifact_bytes(concept: LearnedConcept) -> bytes:
    return save_safetensors({concept.placeholder: concept.vectors}, metadata={"format": "pt"})


operation_seconds = histogram("registry_operation_seconds", "registry operations by backend (folder, s3) and "
                              "operation", LATENCY_BOUNDARIES, "backend", "operation")  # fmt: skip


def _timed(method: Callable) -> Callable:
    """Records the method's duration in ``operation_seconds`` (see pipeline/metrics.py)."""

    @functools.wraps(method)
    def timed(self: Registry, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return method(self, *args, **kwargs)
        finally:
            operation_seconds.observe(time.perf_counter() - started, backend=self.backend, operation=method.__name__)

    return timed


class Registry:
    """Publish, resolve, list and delete concept versions in one storage location."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self.location = storage.location
        self.backend = "s3" if self.location.startswith("s3://") else "folder"  # a metrics label

    @classmethod
    def open(cls, location: str) -> Registry:
        return cls(open_storage(location))

    # --- writing ----------------------------------------------------------------------------------

    @_timed
    def publish(
        self,
        concept: LearnedConcept,
        metrics: dict[str, float] | None = None,
        job_id: str | None = None,
        preview: bytes | None = None,
    ) -> Manifest:
        """Stores a new immutable version: artifact (and preview) first, manifest (the commit) last."""
        validate_name(concept.name)
        if preview is not None:
            check_preview(preview)
        data = _artifact_bytes(concept)
        version = new_version()
        manifest = Manifest(
            name=concept.name,
            version=version,
            placeholder=placeholder(concept.name),
            num_vectors=concept.num_vectors,
            dim=concept.dim,
            base_model=concept.base_model,
            config=concept.config,
            metrics={k: float(v) for k, v in (metrics or {}).items()},
            steps=concept.steps,
            source=concept.source,
            sha256=hashlib.sha256(data).hexdigest(),
            size=len(data),
            created_at=datetime.now(UTC),
            job_id=job_id,
            widths=list(concept.widths) if concept.widths else None,
            preview_sha256=hashlib.sha256(preview).hexdigest() if preview is not None else None,
            preview_size=len(preview) if preview is not None else None,
        )
        written = [_key(concept.name, version, ARTIFACT)]
        try:
            self.storage.put(written[0], data)
            if preview is not None:
                written.append(_key(concept.name, version, PREVIEW))
                self.storage.put(written[-1], preview)
            self.storage.put(_key(concept.name, version, MANIFEST), manifest.to_json().encode())
        except BaseException:
            with contextlib.suppress(StorageError):  # best effort: without a manifest it is invisible
                for key in written:
                    self.storage.delete(key)
            raise
        return manifest

    @_timed
    def attach_preview(self, name: str, version: str, png: bytes) -> Manifest:
        """Gives a version that has no preview one: the image first, then the manifest with its
        checksum (a reader sees the version without a preview until that last write lands)."""
        check_preview(png)
        manifest = self.manifest(name, version)
        if manifest.preview_sha256 is not None:
            raise InputError(f"<{manifest.ref}> already has a preview; versions are immutable")
        updated = manifest.model_copy(update={"preview_sha256": hashlib.sha256(png).hexdigest(),
                                              "preview_size": len(png)})  # fmt: skip
        self.storage.put(_key(name, version, PREVIEW), png)
        self.storage.put(_key(name, version, MANIFEST), updated.to_json().encode())
        return updated

    @_timed
    def delete(self, name: str, version: str) -> Manifest:
        """Removes one version: its manifest first (it disappears at once), then the artifact."""
        manifest = self.manifest(name, version)
        self.storage.delete(_key(name, version, MANIFEST))
        self.storage.delete(_key(name, version, ARTIFACT))
        self.storage.delete(_key(name, version, PREVIEW))
        return manifest

    def gc(self, older_than: timedelta = timedelta(hours=1)) -> list[str]:
        """Deletes artifacts that never got a manifest (interrupted publishes) older than the
        given age (younger ones may be mid-publish). Returns the keys removed."""
        cutoff = datetime.now(UTC) - older_than
        seen: dict[tuple[str, str], set[str]] = {}
        for info in self.storage.list(f"{ROOT}/"):
            parts = info.key.split("/")
            if len(parts) == 4:
                seen.setdefault((parts[1], parts[2]), set()).add(parts[3])
        removed = []
        for (name, version), leaves in seen.items():
            if MANIFEST in leaves or not VERSION_RE.fullmatch(version):
                continue
            created = datetime.strptime(version.split("Z")[0], "%Y%m%dT%H%M%S.%f").replace(tzinfo=UTC)
            if created < cutoff:
                for leaf in leaves:
                    self.storage.delete(_key(name, version, leaf))
                    removed.append(_key(name, version, leaf))
        return removed

    # --- reading ----------------------------------------------------------------------------------

    @_timed
    def versions(self, name: str) -> list[str]:
        """Committed versions of ``name``, oldest first."""
        validate_name(name)
        prefix = f"{ROOT}/{name}/"
        found = []
        for info in self.storage.list(prefix):
            version, _, leaf = info.key.removeprefix(prefix).partition("/")
            if leaf == MANIFEST and VERSION_RE.fullmatch(version):
                found.append(version)
        return sorted(found)

    @_timed
    def manifest(self, name: str, version: str | None = None) -> Manifest:
        """The manifest of ``name@version``, or of the latest version."""
        validate_name(name)
        if version is None:
            versions = self.versions(name)
            if not versions:
                raise ConceptNotFoundError(f"no concept named {name!r} in registry {self.location}")
            version = versions[-1]
        validate_version(version)
        try:
            raw = self.storage.get(_key(name, version, MANIFEST))
        except ObjectNotFoundError:
            message = f"no version {version} of concept {name!r} in registry {self.location}"
            raise ConceptNotFoundError(message) from None
        try:
            manifest = Manifest.model_validate_json(raw)
        except ValidationError:
            raise CorruptConceptError(f"{self.location}/{_key(name, version, MANIFEST)}: unreadable manifest") from None
        if (manifest.name, manifest.version) != (name, version):
            where = f"{self.location}/{_key(name, version, MANIFEST)}"
            raise CorruptConceptError(f"{where}: manifest names another version")
        return manifest

    @_timed
    def find(self, name: str, job_id: str) -> Manifest | None:
        """The newest version of ``name`` published by job ``job_id``, if any (for idempotent jobs)."""
        for version in reversed(self.versions(name)):
            try:
                manifest = self.manifest(name, version)
            except ConceptNotFoundError:  # deleted meanwhile
                continue
            if manifest.job_id == job_id:
                return manifest
        return None

    @_timed
    def get(self, name: str, version: str | None = None) -> tuple[Manifest, LearnedConcept]:
        """The concept ``name@version`` (latest if no version), checksum verified."""
        manifest = self.manifest(name, version)
        key = _key(name, manifest.version, ARTIFACT)
        data = self._read_verified(key, manifest.sha256, "artifact")
        try:
            vectors = load_safetensors(data)[manifest.placeholder]
        except (SafetensorError, KeyError) as err:
            raise CorruptConceptError(f"{self.location}/{key}: unreadable artifact ({err})") from None
        concept = LearnedConcept(
            name=manifest.name,
            vectors=vectors,
            base_model=manifest.base_model,
            steps=manifest.steps,
            final_loss=manifest.metrics.get("final_loss"),
            config=manifest.config,
            source=manifest.source,
            extra={"version": manifest.version},
            widths=tuple(manifest.widths) if manifest.widths else None,
        )
        return manifest, concept

    @_timed
    def preview(self, name: str, version: str | None = None) -> tuple[Manifest, bytes]:
        """The preview image of ``name@version`` (latest if no version), checksum verified."""
        manifest = self.manifest(name, version)
        if manifest.preview_sha256 is None:
            raise NoPreviewError(f"<{manifest.ref}> has no preview image (render one: oneword registry preview)")
        return manifest, self._read_verified(_key(name, manifest.version, PREVIEW), manifest.preview_sha256, "preview")

    def _read_verified(self, key: str, sha256: str, what: str) -> bytes:
        """The bytes stored at ``key``, checked against the checksum the manifest records for them."""
        try:
            data = self.storage.get(key)
        except ObjectNotFoundError:
            raise CorruptConceptError(f"{self.location}/{key}: {what} missing for a committed version") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise CorruptConceptError(
                f"{self.location}/{key}: checksum mismatch (the stored {what} was altered or damaged)"
            )
        return data

    def names(self, prefix: str = "") -> Iterator[str]:
        """Concept names with at least one stored object, sorted."""
        last = None
        for info in self.storage.list(f"{ROOT}/{prefix}"):
            name = info.key.split("/")[1]
            if name != last:
                last = name
                yield name

    @_timed
    def list(self, prefix: str = "", limit: int = 100, after: str | None = None) -> Page:
        """Committed versions whose name starts with ``prefix``, by name then version.
        ``after`` is a ``name@version`` (a page's ``next_after``) to continue from."""
        if not 1 <= limit <= 1000:
            raise InputError(f"limit {limit}: must be between 1 and 1000")
        if prefix and not re.fullmatch(r"[a-z0-9_-]{0,64}", prefix):
            raise InputError(f"invalid name prefix {prefix!r}: names use lowercase a-z, 0-9, '-' and '_'")
        start_after = ""
        if after:
            name, version = parse_ref(after)
            start_after = _key(name, version or "", MANIFEST)
        manifests: list[Manifest] = []
        for info in self.storage.list(f"{ROOT}/{prefix}", start_after=start_after):
            parts = info.key.split("/")
            if len(parts) != 4 or parts[3] != MANIFEST or not VERSION_RE.fullmatch(parts[2]):
                continue
            if len(manifests) == limit:
                return Page(manifests, manifests[-1].ref)
            try:
                manifests.append(self.manifest(parts[1], parts[2]))
            except ConceptNotFoundError:  # deleted while listing
                continue
        return Page(manifests, None)


def manifest_summary(manifest: Manifest) -> dict[str, Any]:
    """The manifest as plain JSON-able values (for ``registry show`` and HTTP answers)."""
    return {**json.loads(manifest.to_json()), "architecture": manifest.architecture}


def default_registry_location() -> str:
    """``$ONEWORD_REGISTRY``, else a folder in the user's data directory (the embedded default)."""
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.environ.get("ONEWORD_REGISTRY") or os.path.join(data_home, "oneword", "registry")
