"""Errors of the audit domain (rendered by the one error handler)."""

from __future__ import annotations

from apix.core.errors import AppError, Conflict, NotFound


class InvalidTimeRange(AppError):
    status_code = 422
    code = "invalid_time_range"
    message = "`from` must be before `to`"


class ReservedAction(AppError):
    status_code = 422
    code = "reserved_action"
    message = "actions starting with `audit.` are recorded by APIX itself"


class ChainBroken(Conflict):
    code = "audit_chain_broken"
    message = "the audit chain does not verify; investigate before pruning"


class UnknownOrganization(NotFound):
    message = "no such organization"
