"""One settings object for every process (CLI, intake, workers).

Environment variables use the prefix ``INSPECT_`` (``INSPECT_DATABASE_URL``, ...).
An optional file named by ``INSPECT_CONFIG`` (dotenv syntax, same keys) is read first;
the environment wins over it. Secrets are ``SecretStr`` so they never show in reprs or logs.

With nothing configured the embedded default applies: a SQLite file and a local object
directory under ``INSPECT_DATA_DIR`` and stages executed in the submitting process.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_CLIP_MODEL = "ViT-B-16-plus-240"
DEFAULT_WEIGHTS = "laion400m_e31"


def _default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "inspect"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="INSPECT_",
        env_file=os.environ.get("INSPECT_CONFIG"),
        extra="ignore",
    )

    data_dir: Path = Field(default_factory=_default_data_dir)
    database_url: str | None = None
    broker_url: str | None = None

    s3_endpoint: str | None = None
    s3_access_key: SecretStr | None = None
    s3_secret_key: SecretStr | None = None
    s3_bucket: str = "inspect"
    s3_secure: bool = False
    s3_region: str | None = None

    clip_model: str = DEFAULT_CLIP_MODEL
    weights: str = DEFAULT_WEIGHTS
    device: str = "auto"
    batch_size: int = 4

    default_threshold: float = 0.5
    strict_categories: bool = False
    # "segment=gpu.segment,logical=gpu.logical": stages not named stay on the default queue.
    queue_routes: str = ""
    default_queue: str = "gpu"
    # Deliveries of one task message before its queue dead-letters it (a frame that crashes workers).
    task_delivery_limit: int = 5
    # Consumer timeout for queues that run long stages (bank builds, LLM descriptions), in ms.
    long_stage_consumer_timeout_ms: int = 4 * 3600 * 1000
    control_queue: str = "control"

    # Grounding DINO for the localize stage: hub id, local save_pretrained folder, or imported name.
    grounding: str = "IDEA-Research/grounding-dino-tiny"
    # Trained FiLo head weights (file or imported name) for segment_method "filo"; none = refuse FiLo.
    filo_weights: str | None = None
    llm_model: str | None = None
    llm_timeout: float = 60.0
    llm_retries: int = 2
    llm_local_path: str | None = None

    # MES intake (``inspect ingest``): queue, inline image limit, redelivery bound, registration policy.
    mes_intake_queue: str = "frames.intake"
    mes_max_inline_bytes: int = 8 * 1024 * 1024  # larger images go through the object store
    mes_delivery_limit: int = 5  # quorum x-delivery-limit: redeliveries before RabbitMQ dead-letters
    mes_register_lines: bool = False  # False: frames for lines not in the lines table are refused
    mes_strict_categories: bool = True  # True: frames for unregistered categories are refused
    # Topology names (orchestrator/mes.py), so a test or a second plant can use its own.
    mes_exchange: str = "frames"
    mes_dead_letter_exchange: str = "frames.dlx"
    mes_dead_queue: str = "frames.dead"
    mes_retry_backoff: float = 1.0  # seconds before requeueing after a transient error (doubles, max 30)

    max_image_bytes: int = 64 * 1024 * 1024
    max_image_pixels: int = 50_000_000
    overlay_max_side: int = 1024

    @property
    def embedded(self) -> bool:
        """True when stages run in-process instead of through a broker."""
        return not self.broker_url

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{self.data_dir / 'inspect.db'}"

    @property
    def objects_dir(self) -> Path:
        return self.data_dir / "objects"

    def stage_queues(self) -> dict[str, str]:
        """Stage name -> queue name; every stage defaults to ``default_queue``."""
        routes: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in self.queue_routes.split(","))):
            stage, sep, queue = item.partition("=")
            if not sep or not stage.strip() or not queue.strip():
                raise ValueError(f"INSPECT_QUEUE_ROUTES item {item!r} is not 'stage=queue'")
            routes[stage.strip()] = queue.strip()
        return routes

    def queue_for(self, stage: str) -> str:
        return self.stage_queues().get(stage, self.default_queue)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings (tests and the CLI's --data-dir change the environment)."""
    get_settings.cache_clear()
