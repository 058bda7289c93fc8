"""Everything the generation service is configured by: one validated model, one source of defaults.

It arrives as the application's ``args`` (``serve deploy`` / KubeRay ``serveConfigV2``, see
``deploy/serve-config.yaml``) or from ``oneword serve`` flags.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ServeSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    base_model: str = Field("shapesworld", description="folder, hub id, s3://... or a bundled model name")
    registry: str | None = Field(None, description="registry location; default $ONEWORD_REGISTRY or the user folder")
    device: str | None = Field(None, description="cpu, cuda ... (default: cuda if available)")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="weights' precision; auto: bf16 on GPUs that support it, else fp32"
    )

    # request limits
    min_size: int = Field(8, ge=8, description="smallest width/height in pixels")
    max_size: int = Field(1024, ge=8, description="largest width/height in pixels")
    max_images: int = Field(8, ge=1, le=64, description="images per request")
    max_steps: int = Field(100, ge=1, le=1000, description="denoising steps per request")
    default_steps: int = Field(25, ge=1, description="denoising steps when a request names none")
    max_prompt_chars: int = Field(2000, ge=1, description="longest prompt accepted, in characters")
    max_body_bytes: int = Field(64 * 1024, ge=1024, description="request bodies larger than this get 413")
    body_timeout_s: float = Field(10.0, gt=0, description="a body not received within this gets 408")
    max_pixel_steps: int = Field(
        512 * 512 * 50 * 8, ge=64, description="compute budget per request: width x height x steps x images"
    )
    max_batch_pixels: int = Field(
        8 * 512 * 512, ge=64, description="batches never exceed this many images x width x height per pipeline call"
    )
    request_timeout_s: float = Field(
        600.0, gt=0, description="a generation not done within this gets 504 and its work stops at the next step"
    )

    # concepts
    concept_ttl_s: float = Field(5.0, ge=0, description="how long 'latest' stays cached before re-resolving")
    concept_cache_size: int = Field(1024, ge=1, description="concept versions kept per replica (LRU)")

    # the console's jobs page
    job_storage: list[str] = Field(
        default_factory=list,
        description="checkpoint_storage locations (s3://... or folders) whose bulk jobs GET /v1/jobs and the "
        "console show",
    )

    # security: comma-separated bearer tokens in this environment variable, or one per line in a file
    api_keys_env: str = Field(
        "ONEWORD_API_KEYS", description="environment variable holding comma-separated bearer tokens (unset: no keys)"
    )
    api_keys_file: str | None = Field(None, description="file with one bearer token per line")
    allow_anonymous: bool = Field(
        False,
        description="serve without API keys on a non-loopback address (oneword serve on 127.0.0.1 needs no keys)",
    )

    # replicas and batching
    min_replicas: int = Field(1, ge=0, description="fewest generation replicas (autoscaling)")
    max_replicas: int = Field(1, ge=1, description="most generation replicas (autoscaling)")
    target_ongoing_requests: float = Field(2.0, gt=0, description="requests per replica autoscaling aims for")
    upscale_delay_s: float = Field(10.0, ge=0, description="seconds of load before a replica is added")
    downscale_delay_s: float = Field(300.0, ge=0, description="seconds of quiet before a replica is removed")
    max_ongoing_requests: int = Field(16, ge=1, description="generation requests one replica works on at once")
    max_queued_requests: int = Field(
        64, ge=0, description="generation requests one replica keeps waiting; beyond, 503 instead of waiting"
    )
    max_light_requests: int = Field(
        16, ge=1, description="health, readiness and concept requests one replica answers beside its generations"
    )
    retry_after_s: float = Field(2.0, ge=0, description="the Retry-After header of that 503, in seconds")
    keep_alive_timeout_s: int = Field(
        5, ge=1, description="the HTTP proxy closes a connection idle this long (oneword serve; http_options in Serve)"
    )
    num_gpus: float = Field(0.0, ge=0, le=8, description="GPU (fraction) per replica")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per replica")
    max_batch_size: int = Field(8, ge=1, description="requests batched into one pipeline call")
    batch_wait_timeout_s: float = Field(0.02, ge=0, description="seconds a request waits for others to batch with")
    health_check_period_s: float = Field(10.0, gt=0, description="seconds between replica health checks")
    health_check_timeout_s: float = Field(30.0, gt=0, description="seconds before a health check fails")
    log_encoding: Literal["TEXT", "JSON"] = Field(
        "TEXT", description="replica logs: TEXT, or JSON lines with Serve's request id, route and replica in each"
    )

    @model_validator(mode="after")
    def _consistent(self) -> ServeSettings:
        if self.min_size > self.max_size:
            raise ValueError("min_size must not exceed max_size")
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        if self.default_steps > self.max_steps:
            raise ValueError("default_steps must not exceed max_steps")
        return self

    def http_options(self, host: str, port: int) -> dict[str, Any]:
        """Serve's ``http_options`` for this service: the proxy drops idle connections after
        ``keep_alive_timeout_s`` and answers 408 to requests past ``request_timeout_s`` plus the
        body's deadline (the replica answers 504 first; this is the backstop for one that hangs)."""
        return {"host": host, "port": port, "keep_alive_timeout_s": self.keep_alive_timeout_s,
                "request_timeout_s": self.request_timeout_s + self.body_timeout_s + 30}  # fmt: skip

    @property
    def replica_capacity(self) -> int:
        """Requests one replica holds: its generations, their queue and the light requests."""
        return self.max_ongoing_requests + self.max_queued_requests + self.max_light_requests

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options``."""
        return {
            "autoscaling_config": {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
                "upscale_delay_s": self.upscale_delay_s,
                "downscale_delay_s": self.downscale_delay_s,
            },
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            # generations queue in the replica (serving/generation_slots.py), so that health and
            # concept reads never wait behind them. Serve's own queue, at each proxy, holds requests
            # until a replica is chosen: a burst waits there for moments, so it gets one replica's
            # whole capacity (a smaller one refused probes during a burst of generations).
            "max_ongoing_requests": self.replica_capacity,
            "max_queued_requests": self.replica_capacity,
            "backpressure_config": {"status_code": 503, "retry_after_s": self.retry_after_s},
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "logging_config": {"encoding": self.log_encoding},
        }
