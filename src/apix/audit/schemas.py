"""Contracts of the audit API."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, Field, StringConstraints

from apix.core.json import dumps
from apix.identity.schemas import JsonObject, Strict

Outcome = Literal["success", "failure", "denied", "error"]
ReportFormat = Literal["json", "csv"]

# An integration's event: at most this much JSON in `details`, this deep.
MAX_DETAILS_BYTES = 8192
MAX_DETAILS_DEPTH = 8


def _bounded(value: dict[str, Any]) -> dict[str, Any]:
    if len(dumps(value)) > MAX_DETAILS_BYTES:
        raise ValueError(f"must serialise to at most {MAX_DETAILS_BYTES} bytes of JSON")
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DETAILS_DEPTH:
            raise ValueError(f"must nest at most {MAX_DETAILS_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return value


Action = Annotated[
    str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*(\.[a-z0-9_-]+){0,5}$", max_length=100)
]
Token = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f]+$", max_length=100)]


class AuditEventCreate(Strict):
    """An event an integration records about itself (stored with `source: integration`)."""

    action: Action = Field(description="Dotted, lower case, e.g. `crm.contact.exported`.")
    target_type: Annotated[Token, StringConstraints(max_length=50)] | None = None
    target_id: Token | None = None
    outcome: Outcome = "success"
    details: Annotated[JsonObject, AfterValidator(_bounded)] = Field(
        default_factory=dict, description="Free-form JSON, 8 KiB and 8 levels at most."
    )


class AuditLogRead(BaseModel):
    id: uuid.UUID
    org_id: uuid.UUID | None
    seq: int
    actor_user_id: uuid.UUID | None
    actor_api_key_id: uuid.UUID | None
    action: str
    target_type: str | None
    target_id: str | None
    outcome: str
    source: str
    ip: str | None
    user_agent: str | None
    request_id: str | None
    details: dict[str, Any]
    created_at: datetime
    prev_hash: str
    hash: str


class AuditLogPage(BaseModel):
    items: list[AuditLogRead]
    next: str | None = Field(description="Pass as `cursor` for the next (older) page.")


class BrokenLink(BaseModel):
    seq: int
    id: uuid.UUID
    reason: str


class ChainVerification(BaseModel):
    org_id: uuid.UUID | None = Field(description="The organisation; null: the platform chain.")
    ok: bool
    checked: int = Field(description="Rows whose hash and link were checked.")
    first_seq: int | None
    last_seq: int | None
    head_hash: str | None = Field(description="The newest row's hash: anchor it elsewhere.")
    checkpoint_seq: int | None = Field(
        description="The last removed row (by retention), vouched for by a signed checkpoint."
    )
    broken: BrokenLink | None = Field(description="The first broken link, when not ok.")


class ActionCount(BaseModel):
    action: str
    count: int


class ActorCount(BaseModel):
    actor_user_id: uuid.UUID | None
    actor_api_key_id: uuid.UUID | None
    count: int


class AuditSummary(BaseModel):
    org_id: uuid.UUID | None
    from_: datetime = Field(alias="from", serialization_alias="from")
    to: datetime
    total: int
    by_outcome: dict[str, int]
    by_action: list[ActionCount]
    by_actor: list[ActorCount]

    model_config = {"populate_by_name": True}


class RetentionRead(BaseModel):
    org_id: uuid.UUID
    retention_days: int = Field(description="Days rows are kept (the override or the default).")
    override: bool = Field(description="True when the organisation set its own retention.")
    default_days: int


class RetentionUpdate(Strict):
    retention_days: int | None = Field(
        ge=1, le=36500, description="Days to keep audit rows; null: back to the default."
    )


class UserActivity(BaseModel):
    actor_user_id: uuid.UUID | None
    actor_api_key_id: uuid.UUID | None
    events: int
    failures: int
    first_at: datetime
    last_at: datetime
    actions: dict[str, int]


class ReportSection(BaseModel):
    count: int
    truncated: bool = Field(description="True when more rows matched than the report lists.")
    events: list[AuditLogRead]


class ComplianceReport(BaseModel):
    org_id: uuid.UUID | None
    from_: datetime = Field(alias="from", serialization_alias="from")
    to: datetime
    generated_at: datetime
    authentication: ReportSection
    failed_access: ReportSection
    privilege_changes: ReportSection
    data_exports: ReportSection
    api_key_lifecycle: ReportSection
    per_user_activity: list[UserActivity]
    chain_verification: ChainVerification

    model_config = {"populate_by_name": True}
