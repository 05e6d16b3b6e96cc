"""`apix audit verify|prune`: check every chain, apply retention (as the application role)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import typer

from apix.audit.service import DEFAULT_RETENTION_DAYS

audit_cli = typer.Typer(help="The tamper-evident audit trail.", no_args_is_help=True)

OrgOption = Annotated[
    uuid.UUID | None,
    typer.Option("--org", help="One organisation's chain (default: every one, and the platform)."),
]


@audit_cli.command("verify")
def verify_command(
    org: OrgOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON document per chain.")] = False,
) -> None:
    """Verify hash chains; print the first broken link of each. Exit 1 if any is broken."""
    from apix.audit.verify import verify

    async def check(database: Any, org_id: uuid.UUID | None, secret: bytes) -> dict[str, Any]:
        return await verify(database, org_id, secret)

    reports = _run(check, org)
    for report in reports:
        if as_json:
            typer.echo(json.dumps(report, default=str))
        else:
            typer.echo(_verdict(report))
    if not all(r["ok"] for r in reports):
        raise typer.Exit(1)


@audit_cli.command("prune")
def prune_command(
    org: OrgOption = None,
    default_days: Annotated[
        int,
        typer.Option(
            min=1,
            envvar="APIX_AUDIT_RETENTION_DAYS",
            help="Retention of organisations that set none, and of the platform chain.",
        ),
    ] = DEFAULT_RETENTION_DAYS,
) -> None:
    """Remove rows past their organisation's retention, leaving a signed checkpoint."""
    from apix.audit.errors import ChainBroken
    from apix.audit.retention import prune

    async def cut(database: Any, org_id: uuid.UUID | None, secret: bytes) -> dict[str, Any]:
        try:
            return await prune(database, org_id, secret, default_days=default_days)
        except ChainBroken as exc:
            return {"org_id": org_id, "error": exc.message, "broken": exc.details}

    failed = False
    for result in _run(cut, org):
        name = _name(result["org_id"])
        if "error" in result:
            failed = True
            typer.echo(f"{name}: not pruned, {result['error']}: {result['broken']}", err=True)
        elif result["removed"]:
            typer.echo(
                f"{name}: removed {result['removed']} rows through seq {result['through_seq']} "
                f"(older than {result['retention_days']} days; checkpoint at seq "
                f"{result['checkpoint_seq']})"
            )
        else:
            typer.echo(f"{name}: nothing older than {result['retention_days']} days")
    if failed:
        raise typer.Exit(1)


Job = Callable[[Any, uuid.UUID | None, bytes], Awaitable[dict[str, Any]]]


def _run(job: Job, org: uuid.UUID | None) -> list[dict[str, Any]]:
    """Run ``job`` on one chain, or on every organisation's and the platform's."""
    from apix.audit.errors import UnknownOrganization
    from apix.audit.service import ensure_organization, organization_ids
    from apix.cli import _database_url, _settings
    from apix.infra.database import Database

    settings = _settings()
    secret = settings.secret_key.get_secret_value().encode()

    async def run(url: str) -> list[dict[str, Any]]:
        database = Database(url, settings.database)
        try:
            if org is not None:
                await ensure_organization(database, org)
                chains: list[uuid.UUID | None] = [org]
            else:
                chains = [None, *await organization_ids(database)]
            return [await job(database, chain, secret) for chain in chains]
        finally:
            await database.dispose()

    with _database_url() as url:
        try:
            return asyncio.run(run(url))
        except UnknownOrganization as exc:
            typer.echo(f"no organization {org}", err=True)
            raise typer.Exit(2) from exc


def _name(org_id: uuid.UUID | None) -> str:
    return "platform" if org_id is None else f"org {org_id}"


def _verdict(report: dict[str, Any]) -> str:
    name = _name(report["org_id"])
    if not report["ok"]:
        broken = report["broken"]
        return f"{name}: BROKEN at seq {broken['seq']} (id {broken['id']}): {broken['reason']}"
    if not report["checked"]:
        return f"{name}: ok, empty"
    since = f" after checkpoint {report['checkpoint_seq']}" if report["checkpoint_seq"] else ""
    return (
        f"{name}: ok, {report['checked']} rows (seq {report['first_seq']}..{report['last_seq']}"
        f"{since}), head {report['head_hash']}"
    )
