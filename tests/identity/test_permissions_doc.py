"""docs/permissions.md shows exactly the role → permission table in code."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from apix.identity.permissions import ROLE_PERMISSIONS, Role


def test_permission_matrix_in_docs_matches_the_code(repo_root: Path) -> None:
    doc = (repo_root / "docs" / "permissions.md").read_text()
    header = next(line for line in doc.splitlines() if line.startswith("| permission |"))
    roles = [Role(cell.strip()) for cell in header.strip("|").split("|")[1:]]
    documented: dict[Role, set[str]] = {role: set() for role in roles}
    for line in doc.splitlines():
        match = re.match(r"^\| `([a-z_]+:[a-z_]+)` \|(.*)\|$", line)
        if match:
            for role, cell in zip(roles, match.group(2).split("|"), strict=True):
                if cell.strip() == "✓":
                    documented[role].add(match.group(1))
    assert set(roles) == set(Role)
    assert {role: frozenset(p) for role, p in documented.items()} == ROLE_PERMISSIONS


def test_higher_roles_hold_every_permission_of_lower_ones() -> None:
    ordered = sorted(Role, key=lambda r: r.rank)
    for lower, higher in itertools.pairwise(ordered):
        assert ROLE_PERMISSIONS[lower] < ROLE_PERMISSIONS[higher]
