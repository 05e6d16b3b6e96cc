"""Request and response contracts of `/api/v1/providers` and `/api/v1/usage`."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import date, datetime
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    model_validator,
)

from apix.providers.types import Capability, ProviderKind

Policy = Literal["primary", "lowest_latency", "fallback"]
HealthStatus = Literal["healthy", "degraded", "unhealthy", "unknown"]
Circuit = Literal["closed", "open", "half_open"]
UsageDimension = Literal["day", "provider", "agent", "model"]

MAX_FALLBACKS = 10


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Numbers and booleans are taken as JSON types only: `"60"` is no number, `0` no `false`.
Number = Annotated[float, Field(strict=True)]
Integer = Annotated[int, Field(strict=True)]
Flag = Annotated[bool, Field(strict=True)]


def _no_control_characters(value: str) -> str:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValueError("must not contain control characters")
    return value


def _http_url(value: str) -> str:
    _no_control_characters(value)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials; set `api_key` instead")
    return value.rstrip("/") if parts.path not in ("", "/") else value


Name = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=100),
    AfterValidator(_no_control_characters),
]
ModelName = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
    AfterValidator(_no_control_characters),
]
BaseUrl = Annotated[
    str, StringConstraints(strip_whitespace=True, max_length=500), AfterValidator(_http_url)
]
ApiKey = Annotated[SecretStr, Field(min_length=1, max_length=1000)]
Timeout = Annotated[Number, Field(gt=0, le=600)]
Capabilities = Annotated[list[Capability], Field(min_length=1, max_length=4)]
FallbackIds = Annotated[list[uuid.UUID], Field(max_length=MAX_FALLBACKS)]


def _unique(values: Sequence[object] | None, what: str) -> None:
    if values is not None and len(set(values)) != len(values):
        raise ValueError(f"{what} must not repeat an entry")


def _chat_only() -> list[Capability]:
    return ["chat"]


class ProviderCreate(Strict):
    name: Name
    kind: ProviderKind
    base_url: BaseUrl | None = Field(
        None, description="Default: the kind's public endpoint (see docs/providers.md)."
    )
    default_model: ModelName
    capabilities: Capabilities = Field(default_factory=_chat_only)
    timeout_s: Timeout = Field(60.0, description="Per-request (and per-chunk) timeout.")
    is_primary: Flag | None = Field(
        None, description="Default: true for the organisation's first provider."
    )
    fallback_ids: FallbackIds = Field(
        default_factory=list, description="Providers to fail over to, in order (same org)."
    )
    api_key: ApiKey | None = Field(None, description="Write-only; stored encrypted.")

    @model_validator(mode="after")
    def _distinct(self) -> ProviderCreate:
        _unique(self.capabilities, "capabilities")
        _unique(self.fallback_ids, "fallback_ids")
        return self


class ProviderUpdate(Strict):
    """Fields to change; `api_key: null` removes the key, leaving it out keeps it."""

    name: Name | None = None
    base_url: BaseUrl | None = None
    default_model: ModelName | None = None
    capabilities: Capabilities | None = None
    timeout_s: Timeout | None = None
    is_primary: Flag | None = None
    fallback_ids: FallbackIds | None = None
    api_key: ApiKey | None = None

    @model_validator(mode="after")
    def _distinct(self) -> ProviderUpdate:
        _unique(self.capabilities, "capabilities")
        _unique(self.fallback_ids, "fallback_ids")
        for field in ("name", "default_model", "capabilities", "timeout_s", "is_primary"):
            if field in self.model_fields_set and getattr(self, field) is None:
                raise ValueError(f"{field} cannot be null")
        if "fallback_ids" in self.model_fields_set and self.fallback_ids is None:
            raise ValueError("fallback_ids cannot be null; use [] for none")
        return self


class LatencyPercentiles(BaseModel):
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None


class ProviderHealth(BaseModel):
    """Measured from the last `health_window` calls (and the last active check)."""

    status: HealthStatus
    circuit: Circuit
    availability: float | None = Field(None, description="Share of calls that succeeded.")
    error_rate: float | None = Field(None, description="Share of calls that failed.")
    latency_ms: LatencyPercentiles = Field(
        default_factory=LatencyPercentiles, description="Time to the first token, successes."
    )
    samples: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    checked_at: datetime | None = None
    check_latency_ms: float | None = None


class ProviderRead(BaseModel):
    id: uuid.UUID
    name: str
    kind: ProviderKind
    base_url: str | None
    effective_base_url: str
    default_model: str
    capabilities: list[str]
    timeout_s: float
    is_primary: bool
    fallback_ids: list[uuid.UUID]
    has_api_key: bool
    api_key_last4: str | None = Field(None, description="Last 4 characters of a long key.")
    health: ProviderHealth
    created_at: datetime
    updated_at: datetime


Prompt = Annotated[str, StringConstraints(min_length=1, max_length=32_000)]


class ProviderTestRequest(Strict):
    prompt: Prompt = "Reply with the single word OK."
    model: ModelName | None = None
    max_tokens: Annotated[Integer, Field(ge=1, le=4096)] = 16


class CallError(BaseModel):
    code: str
    message: str
    provider_status: int | None = None


class TokenUsage(BaseModel):
    input_tokens: int
    output_tokens: int


class ProviderTestResult(BaseModel):
    ok: bool
    provider_id: uuid.UUID
    model: str
    latency_ms: float
    first_token_ms: float | None = None
    reply: str | None = None
    usage: TokenUsage | None = None
    error: CallError | None = None


class Message(Strict):
    """One chat message (limits keep a violating body under the request size limit)."""

    role: Literal["system", "user", "assistant"]
    content: Annotated[str, StringConstraints(max_length=50_000)]


class CompletionRequest(Strict):
    """A routed chat completion: a provider (and model), or a routing policy."""

    provider_id: uuid.UUID | None = None
    policy: Policy | None = None
    model: ModelName | None = None
    messages: Annotated[list[Message], Field(min_length=1, max_length=100)]
    max_tokens: Annotated[Integer, Field(ge=1, le=200_000)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None

    @model_validator(mode="after")
    def _one_target(self) -> CompletionRequest:
        if (self.provider_id is None) == (self.policy is None):
            raise ValueError("give exactly one of provider_id and policy")
        return self


class Hop(BaseModel):
    """One failover: the provider left, why, and the one tried next."""

    from_provider_id: uuid.UUID
    from_provider_name: str
    to_provider_id: uuid.UUID | None
    to_provider_name: str | None
    reason: str
    message: str
    attempts: int
    restarted: bool


class CompletionResult(BaseModel):
    reply: str
    provider_id: uuid.UUID
    provider_name: str
    model: str
    usage: TokenUsage
    cost_usd: float
    latency_ms: float
    first_token_ms: float | None
    finish_reason: str | None
    hops: list[Hop]


class UsageRow(BaseModel):
    day: date | None = None
    provider_id: uuid.UUID | None = None
    provider_name: str | None = None
    agent_id: uuid.UUID | None = None
    model: str | None = None
    calls: int
    failed_calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: float


class UsageTotals(BaseModel):
    calls: int
    failed_calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: float


class UsageReport(BaseModel):
    since: date
    until: date
    group_by: list[UsageDimension]
    rows: list[UsageRow]
    totals: UsageTotals


class PriceSet(Strict):
    input_per_mtok: Annotated[Number, Field(ge=0, le=1_000_000)]
    output_per_mtok: Annotated[Number, Field(ge=0, le=1_000_000)]


class PriceRead(BaseModel):
    model: str
    input_per_mtok: float
    output_per_mtok: float
    source: Literal["settings", "organization"]
