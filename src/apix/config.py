"""APIX settings: one pydantic-settings root with nested sections.

Every field is documented in ``docs/configuration.md`` (a test checks it). Top-level fields
read ``APIX_<NAME>``; a section's fields read ``APIX_<SECTION>__<NAME>``.
"""

from __future__ import annotations

import enum
import functools
import socket
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PLACEHOLDER_SECRET = "change-me-in-production"  # noqa: S105 - the placeholder we refuse outside development


class Environment(enum.StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    PRODUCTION = "production"


class ServerSettings(BaseModel):
    host: str = Field("127.0.0.1", description="Address `apix serve` binds to.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port `apix serve` listens on.")
    workers: int = Field(1, ge=1, le=64, description="Worker processes `apix serve` starts.")
    public_url: str | None = Field(
        None,
        description="Base URL clients use to reach this node (e.g. behind a proxy); "
        "defaults to the request's own URL.",
    )
    graceful_timeout_s: float = Field(
        15.0, gt=0, description="Seconds in-flight requests get to finish after SIGTERM."
    )
    max_body_bytes: int = Field(
        1_048_576, gt=0, description="Largest request body accepted; larger bodies get 413."
    )
    allowed_origins: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Origins browsers may call the API from (CORS) and open WebSockets "
        'from; a JSON list, e.g. `["https://app.example.com"]`; `"*"` allows any (tokens, '
        "not cookies, authenticate). Empty: no cross-origin access at all.",
    )
    gc_freeze: bool = Field(
        True,
        description="Once started, move everything loaded so far out of the garbage "
        "collector's reach (`gc.freeze()`) and collect young objects less often: full "
        "collections then scan only what came later (connections, requests), not the "
        "whole application, which otherwise paused the node for hundreds of milliseconds.",
    )


class DatabaseSettings(BaseModel):
    app_url: str | None = Field(
        None,
        description="URL the node's runtime queries use (the application role). "
        "Default: `APIX_DATABASE_URL` with the user replaced by `app_role`.",
    )
    app_role: str = Field(
        "apix_app",
        pattern=r"^[a-z_][a-z0-9_]{0,62}$",
        description="Application role: owns nothing, no superuser, no BYPASSRLS. "
        "`apix migrate` creates it when the owner may create roles.",
    )
    app_password: SecretStr | None = Field(
        None, description="Password set on (and used for) the application role."
    )
    pool_size: int = Field(10, ge=1, description="Connections kept per process and role.")
    max_overflow: int = Field(10, ge=0, description="Extra connections allowed under load.")
    statement_timeout_ms: int = Field(
        30_000, ge=0, description="Server-side statement timeout for runtime queries (0: none)."
    )
    migrate_on_start: bool = Field(
        True, description="Apply pending migrations when `apix serve` starts."
    )


class RedisSettings(BaseModel):
    max_connections: int = Field(100, ge=1, description="Size of the Redis connection pool.")
    socket_timeout_s: float = Field(5.0, gt=0, description="Timeout of one Redis command.")


class AuthSettings(BaseModel):
    issuer: str = Field("apix", description="`iss` of issued tokens; verified on every token.")
    audience: str = Field("apix", description="`aud` of issued tokens; verified on every token.")
    access_ttl_s: int = Field(900, ge=30, description="Lifetime of an access token (seconds).")
    refresh_ttl_s: int = Field(
        30 * 24 * 3600, ge=60, description="Lifetime of a login session and its refresh tokens."
    )
    keys_dir: Path | None = Field(
        None,
        description="Folder of RS256 signing keys (`<kid>.pem`); the newest signs, all verify. "
        "Default: `<data_dir>/keys`, generated on first start outside production.",
    )
    invitation_ttl_s: int = Field(7 * 24 * 3600, ge=60, description="Lifetime of an invitation.")
    login_failures_per_account: int = Field(
        10, ge=1, description="Failed logins allowed per account per minute; then 429."
    )
    login_failures_per_ip: int = Field(
        50, ge=1, description="Failed logins allowed per client IP per minute; then 429."
    )
    argon2_time_cost: int = Field(2, ge=2, description="argon2id iterations (OWASP minimum 2).")
    argon2_memory_kib: int = Field(
        19_456, ge=19_456, description="argon2id memory in KiB (OWASP minimum 19 MiB)."
    )
    argon2_parallelism: int = Field(1, ge=1, description="argon2id lanes.")


class RealtimeSettings(BaseModel):
    ping_interval_ms: int = Field(25_000, ge=100, description="Server ping interval.")
    pong_timeout_ms: int = Field(10_000, ge=100, description="No pong within this: close 4009.")
    connect_timeout_ms: int = Field(5_000, ge=100, description="No `connect` within this: 4008.")
    max_frame_bytes: int = Field(65_536, ge=1024, description="Largest frame; larger: 1009.")
    send_buffer_bytes: int = Field(
        1_048_576, ge=1024, description="Per-connection send buffer; past it: close 4011."
    )
    commands_per_second: int = Field(100, ge=1, description="Commands per connection per second.")
    command_burst: int = Field(200, ge=1, description="Commands allowed in a burst.")
    publishes_per_second: int = Field(
        10, ge=1, description="Publishes per connection per channel per second."
    )
    max_subscriptions: int = Field(256, ge=1, description="Subscriptions per connection.")
    presence_ttl_s: int = Field(60, ge=5, description="A crashed node's presence expires after.")
    registry_flush_s: float = Field(
        5.0, gt=0, description="How often connection records are written to PostgreSQL."
    )
    sse_heartbeat_s: float = Field(15.0, gt=0, description="SSE comment heartbeat interval.")
    resume_window_s: int = Field(
        120, ge=1, description="How long a dropped connection's session can be resumed."
    )
    ack_timeout_ms: int = Field(
        10_000,
        ge=50,
        description="An `ack` subscription's event not acknowledged within this is sent again.",
    )
    redelivery_backoff_ms: list[int] = Field(
        default_factory=lambda: [1000, 2000, 4000, 8000, 16000],
        description="Extra wait before each further redelivery (with ±20% jitter).",
    )
    max_attempts: int = Field(5, ge=1, description="Sends of one event before it is dead-lettered.")
    max_archive_replay: int = Field(
        10_000,
        ge=0,
        description="Most events a `since` recovery reads from the archive once the stream "
        "no longer holds the position; beyond it, `recovered: false`.",
    )


class WorkerSettings(BaseModel):
    embedded: bool = Field(
        True,
        description="`apix serve` nodes also run the background workers (the archiver). "
        "Set false when dedicated `apix worker` processes run them.",
    )
    archive: bool = Field(
        True,
        description="Keep every tenant channel event (but `monitor`'s) in PostgreSQL "
        "(`apix_event`); stream trimming waits until the archiver has written an event. "
        "False: Redis streams only.",
    )
    archive_batch: int = Field(
        500, ge=1, le=10_000, description="Entries an archiver reads per partition per round."
    )
    archive_retention_days: int = Field(
        30, ge=1, description="Days of archived events kept; older partitions are dropped."
    )
    lease_ms: int = Field(
        15_000,
        ge=1000,
        description="Partition lease of an archiver: a crashed archiver's partitions are "
        "taken over (with its unwritten entries) after this.",
    )
    max_runs: int = Field(8, ge=1, le=1000, description="Agent runs one worker executes at once.")
    run_claim_ms: int = Field(
        60_000,
        ge=1000,
        description="A queued run held this long by a worker that stopped heartbeating is "
        "taken over: failed cleanly (`worker_lost`) if it had started, else run.",
    )
    context_tokens: int = Field(
        8000,
        ge=256,
        description="Prompt budget of a run (estimated at 4 characters a token): the system "
        "prompt, session variables, the input and as many recent messages as fit.",
    )
    provider_checks_s: float = Field(
        300.0,
        ge=0,
        description="Interval of the active provider health checks (a tiny real call to "
        "every provider, by one worker of the cluster); 0: passive measurement only.",
    )


class LogSettings(BaseModel):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Lowest level written."
    )
    format: Literal["auto", "json", "console"] = Field(
        "auto",
        description="`json` lines, readable `console` lines, or `auto`: console on a "
        "terminal, JSON otherwise.",
    )


class ModelPrice(BaseModel):
    """List price of one model, in US dollars per million tokens."""

    input_per_mtok: float = Field(ge=0, description="USD per million input (prompt) tokens.")
    output_per_mtok: float = Field(ge=0, description="USD per million output tokens.")


def _default_prices() -> dict[str, ModelPrice]:
    # Public list prices when this was written; operators set their own table.
    table = {
        "gpt-4o": (2.5, 10.0),
        "gpt-4o-mini": (0.15, 0.6),
        "gpt-4.1": (2.0, 8.0),
        "gpt-4.1-mini": (0.4, 1.6),
        "claude-3-5-haiku": (0.8, 4.0),
        "claude-3-5-sonnet": (3.0, 15.0),
        "claude-sonnet-4": (3.0, 15.0),
        "claude-opus-4": (15.0, 75.0),
        "gemini-2.0-flash": (0.1, 0.4),
        "gemini-1.5-flash": (0.075, 0.3),
    }
    return {m: ModelPrice(input_per_mtok=i, output_per_mtok=o) for m, (i, o) in table.items()}


class ProvidersSettings(BaseModel):
    prices: dict[str, ModelPrice] = Field(
        default_factory=_default_prices,
        description="Price table: model name (or name prefix) to "
        '`{"input_per_mtok": …, "output_per_mtok": …}` in USD per million tokens; each '
        "organisation can override entries.",
    )
    retry_attempts: int = Field(
        3, ge=1, le=10, description="Attempts on one provider (the first included) before failover."
    )
    retry_initial_s: float = Field(
        0.5, gt=0, description="First wait before a retry; doubles with jitter after each."
    )
    retry_max_s: float = Field(8.0, gt=0, description="Longest wait between two retries.")
    breaker_failures: int = Field(
        5, ge=1, description="Consecutive failed calls that open a provider's circuit."
    )
    breaker_open_s: float = Field(
        30.0, gt=0, description="How long an open circuit is skipped before a half-open probe."
    )
    health_window: int = Field(
        100, ge=10, le=10_000, description="Recent calls per provider that health is computed from."
    )
    degraded_error_rate: float = Field(
        0.2, gt=0, le=1, description="Error rate over the window at which a provider is `degraded`."
    )


class MonitoringSettings(BaseModel):
    enabled: bool = Field(
        True,
        description="Measure latencies, keep rolling histograms in Redis and evaluate alerts "
        "(the monitoring API then reads them). False: no sampling, no background loops.",
    )
    push_interval_s: float = Field(
        5.0,
        gt=0,
        description="How often a node pushes its histograms and counters to Redis, where "
        "every node merges them (the cluster view lags by at most this).",
    )
    delivery_sample_every: int = Field(
        16,
        ge=1,
        description="Publish-to-delivery latency is measured on the first delivery of each "
        "event per client type on a node, plus every N-th delivery.",
    )
    probe_interval_s: float = Field(
        5.0, gt=0, description="How often the Redis and PostgreSQL round trips are measured."
    )
    alert_interval_s: float = Field(
        5.0, gt=0, description="How often the node holding the monitoring lease evaluates alerts."
    )
    alert_for_s: float = Field(
        60.0,
        ge=0,
        description="Default time a condition must hold before its alert fires "
        "(an organisation can override it per rule).",
    )
    alert_min_samples: int = Field(
        20,
        ge=1,
        description="Latency alerts are evaluated only on windows with at least this many "
        "samples (a handful of slow deliveries is not an incident).",
    )
    alert_delivery_p99_ms: float = Field(
        250.0, gt=0, description="Default threshold: delivery latency p99 over 1 minute, in ms."
    )
    alert_rtt_p99_ms: float = Field(
        1000.0,
        gt=0,
        description="Default threshold: heartbeat round-trip p99 over 1 minute, in ms.",
    )
    alert_redeliveries_per_min: float = Field(
        100.0, ge=0, description="Default threshold: redeliveries in the last minute."
    )
    alert_dead_letters_per_min: float = Field(
        0.0, ge=0, description="Default threshold: dead letters in the last minute (0: any)."
    )
    alert_archive_lag_s: float = Field(
        60.0,
        gt=0,
        description="Platform threshold: age of the oldest event not archived yet, in seconds.",
    )
    count_events: bool = Field(
        True,
        description="Count every published event for events-in rates and top channels: the "
        "publish script adds it to a counter in Redis, which the node holding the monitoring "
        "lease takes every `alert_interval_s`.",
    )
    metrics_token: SecretStr | None = Field(
        None,
        description="Bearer token `GET /metrics` requires (Prometheus scrapes with it). "
        "Unset: `/metrics` is disabled (404).",
    )

    @property
    def counting(self) -> bool:
        """Whether publishers add their events to the counter the lease holder takes."""
        return self.enabled and self.count_events


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="APIX_",
        env_nested_delimiter="__",
        env_file=".env",
        extra="ignore",
        frozen=True,
    )

    env: Environment = Field(
        Environment.DEVELOPMENT,
        description="`development`, `test` or `production`; outside development and test "
        "the node refuses placeholder secrets.",
    )
    node_id: str = Field(
        default_factory=lambda: socket.gethostname(),
        description="Name of this node in status, logs and the real-time gateway.",
    )
    data_dir: Path = Field(
        Path(".apix"), description="Where embedded PostgreSQL and Redis keep their data."
    )
    database_url: str | None = Field(
        None,
        description="PostgreSQL URL of the schema owner (runs migrations). Unset: an "
        "embedded PostgreSQL 16 in `data_dir`.",
    )
    redis_url: str | None = Field(
        None, description="Redis URL. Unset: an embedded Redis in `data_dir`."
    )
    secret_key: SecretStr = Field(
        SecretStr(PLACEHOLDER_SECRET),
        description="Secret for signing and encrypting server-side values. Must be set "
        "outside development.",
    )
    server: ServerSettings = Field(default_factory=ServerSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    realtime: RealtimeSettings = Field(default_factory=RealtimeSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    providers: ProvidersSettings = Field(default_factory=ProvidersSettings)
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)

    @model_validator(mode="after")
    def _no_placeholder_secrets_in_production(self) -> Settings:
        if self.env is Environment.PRODUCTION:
            if self.secret_key.get_secret_value() in ("", PLACEHOLDER_SECRET):
                raise ValueError(
                    "APIX_SECRET_KEY is unset or a placeholder; set a random value "
                    "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
                )
            if len(self.secret_key.get_secret_value()) < 32:
                raise ValueError("APIX_SECRET_KEY must be at least 32 characters")
        return self

    @property
    def keys_dir(self) -> Path:
        return self.auth.keys_dir or self.data_dir / "keys"

    @property
    def embedded_database(self) -> bool:
        return self.database_url is None

    @property
    def embedded_redis(self) -> bool:
        return self.redis_url is None


@functools.cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment and `.env`."""
    return Settings()
