"""The service's one configuration object, read from the environment (prefix ``CERTSERVE_``).

Every field is documented in the README's settings table; nothing else reads the environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from models.registry import DEFAULT_ROOT


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CERTSERVE_", env_file=None)

    # network
    host: str = Field("127.0.0.1", description="address `python -m service` listens on (0.0.0.0 for all interfaces)")
    port: int = Field(8000, ge=0, le=65535, description="TCP port `python -m service` listens on")
    access_log: bool = Field(False, description="log every request (uvicorn's access log); metrics count them anyway")
    shutdown_grace_s: float = Field(30.0, gt=0, description="on SIGTERM, wait this long for requests in flight")

    # models and device
    model_dir: Path = Field(DEFAULT_ROOT, description="registry folder of checkpoints (manifest.json + weights.pt)")
    models: list[str] = Field(default_factory=list, description="model ids to load; empty = every model in model_dir")
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu' or 'cuda[:k]'")
    threads: int = Field(
        0,
        ge=0,
        description="CPU threads of the forward passes; 0 = PyTorch's default (one per core). Every other "
        "thread of the service computes on one",
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

    # scheduling and limits
    max_pending_samples: int = Field(2_000_000, gt=0, description="queue bound in noise samples; beyond it: 503")
    request_timeout_s: float = Field(300.0, gt=0, description="per-request deadline; past it: 504")
    max_body_bytes: int = Field(8 * 1024 * 1024, gt=0, description="largest request body accepted")
    max_job_bytes: int = Field(256 * 1024 * 1024, gt=0, description="largest batch-job upload accepted")
    max_image_pixels: int = Field(4096 * 4096, gt=0, description="largest decoded image (decompression bombs)")
    max_job_images: int = Field(10_000, gt=0, description="most images in one batch job")
    max_n: int = Field(1_000_000, gt=0, description="largest n (and n0) a request may ask for")

    # defaults of the API parameters
    default_predict_n: int = Field(1_000, gt=0)
    default_n0: int = Field(100, gt=0)
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
    api_keys: list[str] = Field(default_factory=list, description="bearer keys; empty = no authentication")
    signing_key_file: Path | None = Field(
        None,
        description="PEM Ed25519 private key; when set, every certify answer is signed (GET /v1/signing-key "
        "serves the public key). Make one with `python -m service.signing new-key FILE`",
    )
