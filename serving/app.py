"""The generation service: a Ray Serve deployment with a FastAPI ingress.

    POST /v1/generate               prompt with <name> / <name@version> references -> images
    POST /v1/images/generations     the OpenAI Images API subset (b64_json)
    GET  /v1/concepts, /v1/concepts/{name}, /v1/concepts/{name}/preview   the registry
    GET  /v1/jobs, /v1/jobs/{job}   bulk jobs in the configured job_storage locations
    GET  /ui/                       the web console (serving/console/), a client of the routes above
    GET  /healthz, /readyz, /docs (OpenAPI)

Each replica loads the base model once. Requests are resolved (concept references pinned to
versions through the replica's ``ConceptCache``) and then batched with ``@serve.batch``:
requests with the same size, steps and guidance share one pipeline call even when they use
different concepts, because vectors are placed per prompt (``pipeline.engine.concepts``) and each
image has its own seeded generator. Errors are JSON ``{"code", "message"}`` with stable codes;
clients never see a traceback.

    serve run serving.app:build_app base_model=shapesworld       # or: oneword serve
"""

import asyncio
import base64
import difflib
import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.engine.generation_options import GenerationOptions
from serving import metrics
from serving.generation_slots import GenerationSlots, OverloadedError
from serving.metrics import RequestMetrics
from serving.request_guard import RequestGuard, service_keys
from serving.settings import ServeSettings

api = FastAPI(
    title="oneword generation service",
    version="1",
    description="Text-to-image with learned concepts: write <name> or <name@version> in the prompt.",
)


# --- request and response models ------------------------------------------------------------------


class GenerateRequest(GenerationOptions):
    """The generation options every client shares (``oneword generate`` too), and the image format."""

    output_format: Literal["png", "jpeg"] = "png"


class GeneratedImages(BaseModel):
    images: list[str] = Field(description="base64-encoded images")
    format: str
    seed: int
    concepts: dict[str, str] = Field(description="concept name -> the version used")
    width: int
    height: int


class OpenAIImageRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields this service ignores

    prompt: str = Field(min_length=1, max_length=2000)
    model: str | None = None
    n: int = Field(1, ge=1, le=64)
    size: str | None = Field(None, pattern=r"^\d{1,4}x\d{1,4}$", examples=["512x512"])
    response_format: Literal["b64_json"] = "b64_json"


class ApiError(Exception):
    """An error with a stable code and HTTP status, reported as JSON."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.code, self.message, self.headers, self.extra = status, code, message, headers, extra


def _error_response(request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None,
                    **extra: Any) -> JSONResponse:  # fmt: skip
    """The API's error body; ``request_id`` is Serve's id of the request (also the X-Request-Id
    response header, and in the replica's log lines), so a client's report finds the log."""
    body = {"code": code, "message": message, "request_id": request.headers.get("x-request-id"), **extra}
    return JSONResponse(body, status_code=status, headers=headers)


# codes of requests refused for a limit (counted by reason in serving/metrics.py)
LIMIT_CODES = {"too_many_images", "too_many_steps", "invalid_size", "over_compute_budget", "prompt_too_long", "timeout",
               "overloaded"}  # fmt: skip


@api.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    if err.code in LIMIT_CODES:
        metrics.refused.inc(reason=err.code)
    return _error_response(request, err.status, err.code, err.message, err.headers, **err.extra)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    problems = [f"{'.'.join(str(p) for p in e['loc'] if p != 'body')}: {e['msg']}" for e in err.errors()]
    return _error_response(request, 422, "invalid_request", "; ".join(problems) or "invalid request")


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    if err.status_code == 400:  # a body FastAPI could not parse (bad encoding, nesting, huge numbers)
        return _error_response(request, 422, "invalid_request", "request body is not valid JSON")
    code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(err.status_code, "http_error")
    return _error_response(request, err.status_code, code, str(err.detail))


# API keys and the body (limit, deadline) before any route: serving/request_guard.py; around it,
# every request counted and timed (the last added runs first): serving/metrics.py
api.add_middleware(RequestGuard)
api.add_middleware(RequestMetrics)


@api.exception_handler(Exception)
async def _unexpected(request: Request, err: Exception) -> JSONResponse:
    return _error_response(request, 500, "internal_error", "the server failed to handle this request")


# where a concept's training images or checkpoints lie is the trainer's business, not a client's
PRIVATE_CONFIG_FIELDS = ("images", "checkpoint_storage", "out")


def public_summary(manifest) -> dict[str, Any]:
    """A registry manifest as the concept API shows it: without storage locations."""
    from pipeline.store.registry import manifest_summary

    summary = manifest_summary(manifest)
    if summary.get("config"):
        summary["config"] = {k: v for k, v in summary["config"].items() if k not in PRIVATE_CONFIG_FIELDS}
    return summary


# --- the console: static files that ship with the package, under a strict policy ----------------

CONSOLE_DIR = Path(__file__).parent / "console"
CONSOLE_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}  # fmt: skip
CONSOLE_FILES = {p.name: p for p in CONSOLE_DIR.iterdir() if p.suffix in CONSOLE_TYPES} if CONSOLE_DIR.is_dir() else {}
# scripts and styles only from the service itself (no inline code, nothing from elsewhere);
# images also from blob:/data: URLs (previews fetched with the API key, generated images)
CONSOLE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def console_file(name: str) -> Response:
    path = CONSOLE_FILES.get(name)
    if path is None:
        raise ApiError(404, "not_found", f"no console file {name!r}")
    return Response(path.read_bytes(), media_type=CONSOLE_TYPES[path.suffix], headers=CONSOLE_HEADERS)


# --- the work unit that gets batched --------------------------------------------------------------


@dataclass
class RenderJob:
    prompts: list[str]
    negatives: list[str]
    seeds: list[int]
    vectors: dict[str, Any]
    steps: int
    guidance: float
    width: int
    height: int
    abandoned: bool = False  # nobody waits for these images any more (answered, timed out, client gone)

    @property
    def shape(self) -> tuple[int, float, int, int]:
        return (self.steps, self.guidance, self.width, self.height)

    @property
    def pixels(self) -> int:
        return len(self.prompts) * self.width * self.height


def plan_calls(jobs: list[RenderJob], max_pixels: int) -> list[list[int]]:
    """Which jobs share a pipeline call: same steps, guidance and size, and together at most
    ``max_pixels`` (images x width x height, what a call's memory grows with). A job over the budget
    on its own gets a call of its own."""
    calls: list[list[int]] = []
    open_calls: dict[tuple, tuple[list[int], int]] = {}
    for index, job in enumerate(jobs):
        members, pixels = open_calls.get(job.shape, ([], 0))
        if members and pixels + job.pixels > max_pixels:
            members, pixels = [], 0
        if not members:
            calls.append(members)
        members.append(index)
        open_calls[job.shape] = (members, pixels + job.pixels)
    return calls


def _encode(image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if fmt == "jpeg" else "PNG", **({"quality": 95} if fmt == "jpeg" else {}))
    return buffer.getvalue()


@serve.deployment(name="oneword-generator")
@serve.ingress(api)
class Generator:
    """One replica: the base model, the concept cache, the batcher and the HTTP routes."""

    def __init__(self, settings: dict[str, Any] | ServeSettings):
        from pipeline.engine.generation import ImageGenerator, check_compatible
        from pipeline.engine.model import default_device, load_base_model, resolve_dtype
        from pipeline.store.model_cache import local_model_source
        from pipeline.store.registry import Registry, default_registry_location
        from pipeline.store.storage import open_storage
        from serving import request_guard
        from serving.concept_cache import ConceptCache

        self.settings = settings if isinstance(settings, ServeSettings) else ServeSettings(**settings)
        s = self.settings  # no keys and no allow_anonymous: refuse before the model is loaded
        keys = service_keys(s.api_keys_env, s.api_keys_file, s.allow_anonymous)
        request_guard.configure(self.settings.max_body_bytes, self.settings.body_timeout_s, keys)
        device = self.settings.device or default_device()
        dtype = resolve_dtype(self.settings.precision, device)
        self.model = load_base_model(local_model_source(self.settings.base_model), device, dtype)
        self.generator = ImageGenerator(self.model)
        self.registry = Registry.open(self.settings.registry or default_registry_location())
        self.job_storages = [open_storage(location) for location in self.settings.job_storage]
        self.cache = ConceptCache(self.registry, self.settings.concept_ttl_s, self.settings.concept_cache_size,
                                  check=lambda concept: check_compatible(concept, self.model),
                                  on_load=metrics.load_seconds.observe)  # fmt: skip
        self.busy_since: float | None = None  # when the running pipeline call started (monotonic)
        self.slots = GenerationSlots(self.settings.max_ongoing_requests, self.settings.max_queued_requests)
        self._render_batch.set_max_batch_size(self.settings.max_batch_size)
        self._render_batch.set_batch_wait_timeout_s(self.settings.batch_wait_timeout_s)
        self.ready = True

    def _size(self, value: int | None, field: str) -> int:
        s = self.settings
        size = value if value is not None else self.model.resolution
        if size % 8 or not s.min_size <= size <= s.max_size:
            raise ApiError(
                422, "invalid_size", f"{field} {size}: must be a multiple of 8 from {s.min_size} to {s.max_size}"
            )
        return size

    def _resolve(self, prompt: str, negative: str, cached_only: bool = False):
        """The prompt with its concepts pinned and loaded, or (``cached_only``) None on a cache miss."""
        from pipeline.engine.concepts import PromptTooLongError
        from pipeline.engine.generation import IncompatibleConceptError
        from pipeline.errors import InputError
        from pipeline.store.registry import ConceptNotFoundError

        limit = self.settings.max_prompt_chars
        for field, text in (("prompt", prompt), ("negative prompt", negative)):
            if len(text) > limit:
                raise ApiError(422, "prompt_too_long", f"{field} over {limit} characters")
        outcome = metrics.resolutions
        try:
            resolved = self.cache.resolve(prompt, negative, cached_only)
        except ConceptNotFoundError as err:
            outcome.inc(outcome="not_found")
            wanted = str(err).split("'")[1] if "'" in str(err) else ""
            close = difflib.get_close_matches(wanted, list(self.registry.names()), n=3, cutoff=0.5)
            message = str(err).replace(f"registry {self.registry.location}", "the registry")
            raise ApiError(404, "concept_not_found", message, close_matches=close) from None
        except IncompatibleConceptError as err:
            outcome.inc(outcome="incompatible")
            raise ApiError(409, "incompatible_concept", str(err)) from None
        except InputError as err:  # a name or version that breaks the naming rule
            outcome.inc(outcome="invalid")
            raise ApiError(422, "invalid_concept_name", str(err)) from None
        if resolved is None:
            return None
        if resolved.versions:
            outcome.inc(outcome="memory" if cached_only else "registry")
        counts = {key: v.shape[0] for key, v in resolved.vectors.items()}
        for field, text in (("prompt", resolved.prompt), ("negative prompt", resolved.negative)):
            try:  # the token limit, after concept expansion
                self.generator.encoder.tokenize(text, counts)
            except PromptTooLongError as err:
                message = f"{field} needs {err.tokens} tokens after concept expansion, the limit is {err.limit}"
                raise ApiError(422, "prompt_too_long", message) from None
        return resolved

    def _check_limits(self, request: GenerateRequest) -> tuple[int, int, int]:
        """Steps, width and height of a request within the service's limits, or the error naming one."""
        s = self.settings
        if request.n > s.max_images:
            raise ApiError(422, "too_many_images", f"n {request.n}: at most {s.max_images} images per request")
        steps = request.steps or s.default_steps
        if steps > s.max_steps:
            raise ApiError(422, "too_many_steps", f"steps {steps}: at most {s.max_steps}")
        width, height = self._size(request.width, "width"), self._size(request.height, "height")
        cost = width * height * steps * request.n
        if cost > s.max_pixel_steps:
            raise ApiError(422, "over_compute_budget", f"width x height x steps x n = {width} x {height} x {steps} "
                           f"x {request.n} = {cost}: over the budget of {s.max_pixel_steps} per request")  # fmt: skip
        return steps, width, height

    async def _render(self, request: GenerateRequest) -> tuple[list, int, dict[str, str], int, int]:
        """A request's images: checked, its concepts resolved, then a generation slot (waiting for
        one in this replica's queue), all within ``request_timeout_s``."""
        steps, width, height = self._check_limits(request)
        # Concepts in the cache resolve right here; a miss asks the registry from a worker thread.
        resolved = self._resolve(request.prompt, request.negative_prompt, cached_only=True)
        if resolved is None:
            resolved = await asyncio.to_thread(self._resolve, request.prompt, request.negative_prompt)
        seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(4), "big") >> 1
        job = RenderJob([resolved.prompt] * request.n, [resolved.negative] * request.n,
                        [seed + i for i in range(request.n)], resolved.vectors, steps, request.guidance_scale,
                        width, height)  # fmt: skip

        async def in_a_slot() -> list:
            async with self.slots.hold():
                return await self._render_batch(job)

        try:
            images = await asyncio.wait_for(in_a_slot(), self.settings.request_timeout_s)
        except OverloadedError as err:
            retry = str(max(0, math.ceil(self.settings.retry_after_s)))
            raise ApiError(503, "overloaded", f"{err}; retry after {retry} s", {"Retry-After": retry}) from None
        except TimeoutError:
            limit = self.settings.request_timeout_s
            message = f"not done within request_timeout_s ({limit:g} s); try fewer images, steps or pixels"
            raise ApiError(504, "timeout", message) from None
        finally:  # done, timed out or its client gone: its call may stop at the next step
            job.abandoned = True
        metrics.images.inc(len(images))
        return images, seed, resolved.versions, width, height

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02)
    async def _render_batch(self, jobs: list[RenderJob]) -> list[list]:
        """Pipeline calls for the jobs (see ``plan_calls``); a call whose jobs are all abandoned stops
        at its next denoising step."""
        results: list[list] = [[] for _ in jobs]
        for members in plan_calls(jobs, self.settings.max_batch_pixels):
            first = jobs[members[0]]
            prompts = [p for i in members for p in jobs[i].prompts]
            negatives = [p for i in members for p in jobs[i].negatives]
            seeds = [x for i in members for x in jobs[i].seeds]
            vectors = {k: v for i in members for k, v in jobs[i].vectors.items()}
            if all(jobs[i].abandoned for i in members):
                continue
            metrics.batch_images.observe(len(prompts))
            metrics.batch_requests.observe(len(members))
            self.busy_since = time.monotonic()
            try:
                images = await asyncio.to_thread(
                    self.generator.generate, prompts, vectors, negative_prompts=negatives, seeds=seeds,
                    steps=first.steps, guidance_scale=first.guidance, height=first.height, width=first.width,
                    should_stop=lambda members=members: all(jobs[i].abandoned for i in members),
                )  # fmt: skip
            finally:
                self.busy_since = None
            offset = 0
            for i in members:
                results[i] = images[offset : offset + len(jobs[i].prompts)]
                offset += len(jobs[i].prompts)
        return results

    # --- routes ---

    @api.post("/v1/generate", response_model=GeneratedImages, responses={200: {"content": {"image/png": {}}}})
    async def generate(self, body: GenerateRequest, request: Request) -> Any:
        images, seed, versions, width, height = await self._render(body)
        if len(images) == 1 and request.headers.get("accept", "").startswith(f"image/{body.output_format}"):
            return Response(_encode(images[0], body.output_format), media_type=f"image/{body.output_format}")
        encoded = [base64.b64encode(_encode(image, body.output_format)).decode() for image in images]
        return GeneratedImages(images=encoded, format=body.output_format, seed=seed, concepts=versions,
                               width=width, height=height)  # fmt: skip

    @api.post("/v1/images/generations")
    async def openai_images(self, body: OpenAIImageRequest) -> dict[str, Any]:
        width = height = None
        if body.size:
            width, height = (int(x) for x in body.size.split("x"))
        try:
            generate = GenerateRequest(prompt=body.prompt, n=body.n, width=width, height=height)
        except ValidationError as err:
            if any(e["loc"][0] in ("width", "height") for e in err.errors()):
                raise ApiError(422, "invalid_size", f"size {body.size}: width and height must be multiples of 8 "
                               f"from {self.settings.min_size} to {self.settings.max_size}") from None  # fmt: skip
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
            raise ApiError(422, "invalid_request", problems) from None
        images, *_ = await self._render(generate)
        data = [{"b64_json": base64.b64encode(_encode(image, "png")).decode()} for image in images]
        return {"created": int(time.time()), "data": data}

    @api.get("/v1/concepts")
    async def list_concepts(self, prefix: str = "", limit: int = 100, after: str | None = None):
        from pipeline.errors import InputError

        try:
            page = await asyncio.to_thread(self.registry.list, prefix, limit, after)
        except InputError as err:
            raise ApiError(422, "invalid_request", str(err)) from None
        return {"concepts": [public_summary(m) for m in page.manifests], "next_after": page.next_after}

    @api.get("/v1/concepts/{name}")
    async def show_concept(self, name: str):
        from pipeline.engine.concepts import InvalidNameError
        from pipeline.store.registry import ConceptNotFoundError

        try:
            manifest = await asyncio.to_thread(self.registry.manifest, name)
            versions = await asyncio.to_thread(self.registry.versions, name)
        except InvalidNameError as err:
            raise ApiError(422, "invalid_concept_name", str(err)) from None
        except ConceptNotFoundError:
            close = difflib.get_close_matches(name, list(self.registry.names()), n=3, cutoff=0.5)
            raise ApiError(404, "concept_not_found", f"no concept named {name!r}", close_matches=close) from None
        return {"latest": public_summary(manifest), "versions": versions}

    @api.get("/v1/concepts/{name}/preview", responses={200: {"content": {"image/png": {}}}})
    async def concept_preview(self, name: str, version: str | None = None) -> Response:
        """The version's preview image (latest if no version); 404 ``no_preview`` when it has none."""
        from pipeline.errors import InputError
        from pipeline.store.registry import ConceptNotFoundError, NoPreviewError

        try:
            manifest, png = await asyncio.to_thread(self.registry.preview, name, version)
        except NoPreviewError as err:
            raise ApiError(404, "no_preview", str(err)) from None
        except ConceptNotFoundError as err:
            message = str(err).replace(f" in registry {self.registry.location}", "")
            raise ApiError(404, "concept_not_found", message) from None
        except InputError as err:
            raise ApiError(422, "invalid_concept_name", str(err)) from None
        cache = "private, max-age=31536000, immutable" if version else "private, no-cache"
        return Response(png, media_type="image/png", headers={"Cache-Control": cache, "X-Concept-Version":
                                                                manifest.version})  # fmt: skip

    def _job_statuses(self) -> dict[str, dict[str, Any]]:
        """Every job in the configured ``job_storage`` locations, by id (the first location that
        holds an id wins)."""
        from pipeline.store.job_records import job_names, read_job_status

        found: dict[str, dict[str, Any]] = {}
        for storage in self.job_storages:
            for job in job_names(storage):
                if job not in found and (status := read_job_status(storage, job)) is not None:
                    found[job] = status
        return found

    def _job_status(self, job: str) -> dict[str, Any]:
        from pipeline.store.job_records import JOB_ID_RE, JOB_ID_RULE, read_job_status

        if not JOB_ID_RE.fullmatch(job):
            raise ApiError(422, "invalid_request", f"invalid job id {job!r}: {JOB_ID_RULE}")
        for storage in self.job_storages:
            if (status := read_job_status(storage, job)) is not None:
                return status
        where = "no job_storage is configured" if not self.job_storages else "not in the configured job_storage"
        raise ApiError(404, "job_not_found", f"no job {job!r}: {where}")

    @api.get("/v1/jobs")
    async def list_jobs(self) -> dict[str, Any]:
        """The bulk jobs in the service's ``job_storage`` locations: state, counts and times each."""
        from pipeline.store.storage import StorageUnavailableError

        try:
            statuses = await asyncio.to_thread(self._job_statuses)
        except StorageUnavailableError as err:
            raise ApiError(503, "storage_unavailable", f"job storage: {err}") from None
        fields = ("job", "state", "counts", "started_at", "updated_at", "error")
        return {"jobs": [{k: status.get(k) for k in fields} for status in statuses.values()]}

    @api.get("/v1/jobs/{job}")
    async def show_job(self, job: str) -> dict[str, Any]:
        """A bulk job's status as its driver keeps it: every concept's state, step, loss, ETA, error."""
        from pipeline.store.storage import StorageUnavailableError

        try:
            return await asyncio.to_thread(self._job_status, job)
        except StorageUnavailableError as err:
            raise ApiError(503, "storage_unavailable", f"job storage: {err}") from None

    # --- the console (no API key: static files; every call they make is an API call with its key)

    @api.get("/ui", include_in_schema=False)
    async def console_root(self) -> Response:
        return RedirectResponse("ui/")  # relative: right behind any route prefix

    @api.get("/ui/", include_in_schema=False)
    async def console_index(self) -> Response:
        return console_file("index.html")

    @api.get("/ui/{name}", include_in_schema=False)
    async def console_asset(self, name: str) -> Response:
        return console_file(name)

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self, request: Request) -> Any:
        """Ready when the model is loaded and no pipeline call has run past ``request_timeout_s``; says
        how many generations this replica runs and queues."""
        busy = time.monotonic() - self.busy_since if self.busy_since is not None else 0.0
        if busy > self.settings.request_timeout_s:
            message = f"one generation has run for {busy:.0f} s, past request_timeout_s"
            return _error_response(request, 503, "stuck", message)
        generations = {"running": self.slots.running, "waiting": self.slots.waiting}
        return {"status": "ready" if self.ready else "loading", "base_model": self.model.identity,
                "generations": generations}  # fmt: skip

    def check_health(self) -> None:
        """Serve's replica health check: a replica without a model is restarted."""
        if not self.ready:
            raise RuntimeError("model not loaded")


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application builder for ``serve run`` / ``serve deploy`` / KubeRay ``serveConfigV2``."""
    settings = ServeSettings(**args)
    return Generator.options(**settings.deployment_options()).bind(settings.model_dump())
