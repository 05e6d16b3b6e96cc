"""Row-level security for tenant tables, used by migrations.

Every table with `org_id` gets a policy on `apix_current_org()` (the transaction-local
tenant) for reads (USING) and writes (WITH CHECK), and FORCE ROW LEVEL SECURITY so that not
even the owner reads across tenants by accident.
"""

from __future__ import annotations

from alembic import op

TENANT = "org_id = apix_current_org()"


def enable_tenant_rls(table: str, *, using: str = TENANT, check: str = TENANT) -> None:
    op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
    op.execute(f"CREATE POLICY tenant_isolation ON {table} USING ({using}) WITH CHECK ({check})")


def disable_tenant_rls(table: str) -> None:
    op.execute(f"DROP POLICY IF EXISTS tenant_isolation ON {table}")
    op.execute(f"ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY")
