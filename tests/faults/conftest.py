"""Fixtures of the fault-injection tests: gateway nodes started (and always stopped) per test,
and the one-line summaries of each run repeated at the end of the session."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.faults.processes import Node, start_node
from tests.identity.factories import Account, new_org_admin

StartNodes = Callable[..., list[Node]]

SUMMARY = "fault_summary"


@pytest.fixture
def start_nodes(tmp_path: Path) -> Iterator[StartNodes]:
    """Start ``count`` `apix serve` nodes on the given servers and wait until they are ready.

    The first creates the signing key the others share, so it is ready before they start.
    """
    started: list[Node] = []

    def start(
        count: int,
        *,
        database_url: str,
        redis_url: str,
        env: dict[str, str] | None = None,
    ) -> list[Node]:
        nodes = []
        for index in range(count):
            node = start_node(
                f"node-{'abcdefgh'[len(started)]}",
                database_url=database_url,
                redis_url=redis_url,
                tmp=tmp_path,
                env=env,
            )
            started.append(node)
            nodes.append(node)
            if index == 0:
                node.wait_ready()
        for node in nodes[1:]:
            node.wait_ready()
        return nodes

    try:
        yield start
    finally:
        for node in started:
            node.stop()


async def admin_on(node: Node) -> Account:
    """A new organisation and its ORG_ADMIN, registered through ``node``'s HTTP API."""
    async with httpx.AsyncClient(base_url=node.http, timeout=30) as http:
        return await new_org_admin(http)


@pytest.fixture
def record_summary(record_property: Callable[[str, object], None]) -> Callable[[str], None]:
    def record(line: str) -> None:
        record_property(SUMMARY, line)

    return record


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    lines = [
        value
        for reports in terminalreporter.stats.values()
        for report in reports
        if getattr(report, "when", None) == "call"
        for name, value in getattr(report, "user_properties", [])
        if name == SUMMARY
    ]
    if lines:
        terminalreporter.section("fault-injection results")
        for line in lines:
            terminalreporter.write_line(str(line))
