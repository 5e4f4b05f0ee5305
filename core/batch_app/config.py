"""Typed settings, read once from the environment or `.env` (every name is in `.env.example`)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    api_host: str = "127.0.0.1"
    api_port: int = 4080
    database_url: str = ""
    data_dir: Path = Path("./data")
    log_dir: Path = Path("./logs")
    api_key: str = ""
    sentry_dsn: str = ""

    # Models and engines.
    model: str = ""
    engine: str = "vllm"
    require_live_worker: bool = True

    # Limits on uploads and batches.
    max_file_bytes: int = 200 * 1024 * 1024
    max_file_lines: int = 50_000
    max_line_bytes: int = 4 * 1024 * 1024
    completion_window_seconds: int = 24 * 3600

    # Liveness.
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 60.0
    max_attempts: int = 3


@lru_cache
def get_settings() -> Settings:
    return Settings()
