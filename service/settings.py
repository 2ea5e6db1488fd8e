"""The service's one configuration object, read from the environment (prefix ``CERTSERVE_``).

Every field is documented in the README's settings table; nothing else reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.registry import DEFAULT_ROOT
from service.engine.scheduler import DEFAULT_SHARES, Priority
from smoothing.sequential import DEFAULT_DECISION_N0


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CERTSERVE_", env_file=None)

    # network
    host: str = Field("127.0.0.1", description="address `python -m service` listens on (0.0.0.0 for all interfaces)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port `python -m service` listens on")
    access_log: bool = Field(False, description="log every request (uvicorn's access log); metrics count them anyway")
    shutdown_grace_s: float = Field(
        30.0,
        gt=0,
        description="on SIGTERM, wait this long for requests in flight; those still running a second before it "
        "ends are answered 503 with Retry-After",
    )
    keep_alive_s: float = Field(5.0, gt=0, description="close an idle keep-alive connection after this long")
    max_connections: int = Field(
        1024, gt=0, description="concurrent connections and requests; beyond them uvicorn answers 503"
    )
    body_read_timeout_s: float = Field(
        10.0, gt=0, description="a request body that sends nothing for this long is answered 408"
    )

    # models and device
    model_dir: Path = Field(DEFAULT_ROOT, description="registry folder of checkpoints (manifest.json + weights.pt)")
    models: list[str] = Field(default_factory=list, description="model ids to load; empty = every model in model_dir")
    default_model: str | None = Field(
        None,
        description="model answering requests that name none; unset = the first of CERTSERVE_MODELS, else the "
        "first plain classifier loaded (not a composed one, which costs several forward passes a sample)",
    )
    devices: str = Field(
        "auto",
        description="the executors: 'auto' (every visible CUDA GPU, else the CPU as measured best), a list "
        "('cuda:0,cuda:1'), 'cpu', or 'cpu*2' (also 'cpu×2', 'cpu:2') for two CPU executors splitting the threads",
    )
    threads: int = Field(
        0,
        ge=0,
        description="CPU threads of the forward passes in all, split among the CPU executors; 0 = one per core. "
        "Every other thread of the service computes on one",
    )
    max_batch: int = Field(0, ge=0, description="cap on samples per forward pass; 0 = the measured best batch size")
    precision: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="arithmetic of the base classifier: 'auto' = float32 unless bfloat16 autocast (float16 too on "
        "CUDA) is measured 1.2x faster at load time; certificates hold for the classifier actually run",
    )
    batch_delay_ms: float = Field(
        0.0,
        ge=0,
        description="wait up to this long for more work before a batch that is not full, counted from "
        "the oldest queued item (work that arrives while the device is busy batches anyway)",
    )
    tuning_cache: Path | None = Field(
        Path("state/tuning.json"), description="JSON file caching the batch-size sweep across restarts"
    )
    refine_batch_size: bool = Field(
        True,
        description="refine each model's batch size while serving from the timings of full batches (now and then "
        "a batch at a neighbouring size; a move needs 10% more samples/s) and store a move in tuning_cache; "
        "precision is chosen at start only",
    )

    # scheduling and limits
    max_pending_samples: int = Field(
        2_000_000, gt=0, description="queue bound in noise samples, for each priority class; beyond it: 503"
    )
    class_shares: dict[Literal["predict", "certify", "job"], Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: {p.name.lower(): share for p, share in DEFAULT_SHARES.items()},
        description="share of the device's samples each class of work is guaranteed while it has work "
        "(weights, normalised to sum 1); work a class leaves unused goes to the others",
    )
    request_timeout_s: float = Field(300.0, gt=0, description="per-request deadline; past it: 504")
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0, description="largest request body accepted")
    max_job_bytes: int = Field(256 * 1024 * 1024, gt=0, description="largest batch-job upload accepted")
    max_image_pixels: int = Field(4096 * 4096, gt=0, description="largest decoded image (decompression bombs)")
    max_decoding_bytes: int = Field(
        256 * 1024 * 1024,
        gt=0,
        description="bytes of job uploads being decompressed at once, all uploads together; beyond it: 503",
    )
    max_job_images: int = Field(10_000, gt=0, description="most images in one batch job")
    max_n: int = Field(1_000_000, gt=0, description="largest n (and n0) a request may ask for")

    # defaults of the API parameters
    default_predict_n: int = Field(1_000, gt=0)
    default_n0: int = Field(100, gt=0)
    default_radius_n0: int = Field(
        DEFAULT_DECISION_N0, gt=0, description="n0 of the radius decision (mode 'radius') when a request gives none"
    )
    default_n: int = Field(100_000, gt=0)
    default_alpha: float = Field(0.001, gt=0, lt=0.5)

    # state
    redis_url: str | None = Field(
        None, description="e.g. redis://127.0.0.1:6379/0; unset = in-process cache and SQLite jobs"
    )
    cache_redis_url: str | None = Field(
        None,
        description="a Redis of its own for the certificate cache (an LRU policy and a memory cap); "
        "unset = the cache lives in redis_url beside the jobs",
    )
    cache_ttl_s: int = Field(7 * 24 * 3600, gt=0, description="certificate cache time-to-live")
    cache_size: int = Field(10_000, gt=0, description="entries of the in-process LRU cache (no Redis)")
    job_db: Path = Field(Path("state/jobs.sqlite3"), description="SQLite job store when Redis is not configured")

    # batch jobs on many machines (Dramatiq workers; README "Adding a worker host")
    job_backend: Literal["inprocess", "dramatiq"] = Field(
        "inprocess",
        description="'inprocess': jobs run in the API process; 'dramatiq': the API enqueues messages on Redis "
        "(CERTSERVE_REDIS_URL) and `python -m service.jobs.worker` processes run them",
    )
    job_message_images: int = Field(
        8, gt=0, description="images per Dramatiq message; a message must finish well within job_time_limit_s"
    )
    job_time_limit_s: float = Field(600.0, gt=0, description="longest a worker may spend on one message (Dramatiq's)")
    job_max_retries: int = Field(3, ge=0, description="retries of a failing message before its job is marked failed")
    worker_threads: int = Field(2, gt=0, description="messages a worker process runs at once (and prefetches)")
    worker_metrics_port: int = Field(9191, ge=0, le=65535, description="port of a worker's Prometheus /metrics")
    worker_heartbeat_timeout_ms: int = Field(
        60_000, gt=0, description="a worker silent this long is taken for dead and its messages requeued (Dramatiq's)"
    )
    worker_maintenance_chance: int = Field(
        1_000,
        ge=0,
        le=1_000_000,
        description="per million broker calls: how often a worker requeues dead workers' messages (Dramatiq's)",
    )

    @model_validator(mode="after")
    def _dramatiq_needs_redis(self) -> Settings:
        if self.job_backend == "dramatiq" and not self.redis_url:
            raise ValueError("CERTSERVE_JOB_BACKEND=dramatiq needs CERTSERVE_REDIS_URL (broker and job store)")
        return self

    api_keys: list[str] = Field(default_factory=list, description="bearer keys; empty = no authentication")
    signing_key_file: Path | None = Field(
        None,
        description="PEM Ed25519 private key; when set, every certify answer is signed (GET /v1/signing-key "
        "serves the public key). Make one with `python -m service.signing new-key FILE`",
    )

    @property
    def shares(self) -> dict[Priority, float]:
        """``class_shares`` by scheduler class."""
        return {Priority[name.upper()]: share for name, share in self.class_shares.items()}

    @model_validator(mode="after")
    def defaults_within_limits(self) -> Settings:
        """Refuse at start-up defaults that every request without n would be blamed for (a 422 per request)."""
        for name in ("default_predict_n", "default_n0", "default_radius_n0", "default_n"):
            if getattr(self, name) > self.max_n:
                raise ValueError(
                    f"CERTSERVE_{name.upper()} = {getattr(self, name)} is above CERTSERVE_MAX_N = {self.max_n}: "
                    f"lower {name} or raise max_n"
                )
        missing = {p.name.lower() for p in Priority} - set(self.class_shares)
        if missing:
            raise ValueError(f"CERTSERVE_CLASS_SHARES needs a share for every class; missing {sorted(missing)}")
        return self
