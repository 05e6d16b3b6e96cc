"""audit chain: per-organisation hash chain on audit_log, retention settings, pruning function

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from apix.migrations.rls import disable_tenant_rls, enable_tenant_rls

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Each field length-prefixed (`<bytes>:<text>`, `~` for NULL) after a format tag; the same
# encoding as `apix.audit.chain.canonical`, which verification recomputes independently.
_HASH = """
CREATE FUNCTION apix_audit_hash(r audit_log) RETURNS varchar
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT encode(sha256(convert_to('apix.audit.v1' || string_agg(
        coalesce(octet_length(convert_to(f, 'UTF8'))::text || ':' || f, '~'), '' ORDER BY n
    ), 'UTF8')), 'hex')
    FROM unnest(ARRAY[
        r.id::text, r.org_id::text, r.seq::text, r.prev_hash,
        to_char(r.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'),
        r.actor_user_id::text, r.actor_api_key_id::text, r.action, r.target_type,
        r.target_id, r.outcome, r.source, r.ip, r.user_agent, r.request_id, r.details::text
    ]) WITH ORDINALITY AS field(f, n)
$$
"""

# Every insert, whoever makes it, is appended to its organisation's chain (the platform's
# when org_id is NULL). The advisory lock, held to the end of the inserting transaction,
# queues concurrent writers of one chain; the head query runs after it (a trigger function
# is volatile, so under READ COMMITTED it sees what the previous writer committed).
_CHAIN = """
CREATE FUNCTION apix_audit_chain() RETURNS trigger
LANGUAGE plpgsql
AS $$
DECLARE
    head record;
BEGIN
    PERFORM pg_advisory_xact_lock(
        hashtextextended('apix.audit:' || coalesce(NEW.org_id::text, 'platform'), 0));
    IF NEW.org_id IS NULL THEN
        SELECT seq, hash INTO head FROM audit_log
        WHERE org_id IS NULL ORDER BY seq DESC LIMIT 1;
    ELSE
        SELECT seq, hash INTO head FROM audit_log
        WHERE org_id = NEW.org_id ORDER BY seq DESC LIMIT 1;
    END IF;
    NEW.seq := coalesce(head.seq, 0) + 1;
    NEW.prev_hash := coalesce(head.hash, repeat('0', 64));
    NEW.created_at := clock_timestamp();
    NEW.hash := apix_audit_hash(NEW);
    RETURN NEW;
END
$$
"""

# Rows written before the chain existed, linked oldest first, one chain per organisation.
_BACKFILL = """
DO $$
DECLARE
    r audit_log;
    chain_org uuid;
    started boolean := false;
    prev varchar;
    n bigint;
BEGIN
    FOR r IN SELECT * FROM audit_log ORDER BY org_id NULLS FIRST, created_at, id LOOP
        IF NOT started OR r.org_id IS DISTINCT FROM chain_org THEN
            n := 0;
            prev := repeat('0', 64);
        END IF;
        started := true;
        chain_org := r.org_id;
        n := n + 1;
        r.seq := n;
        r.prev_hash := prev;
        r.hash := apix_audit_hash(r);
        UPDATE audit_log SET seq = r.seq, prev_hash = r.prev_hash, hash = r.hash
        WHERE id = r.id;
        prev := r.hash;
    END LOOP;
END
$$
"""

# The application role may not delete audit rows. This owner-rights function removes a
# chain's prefix through `p_through_seq`, and only once a checkpoint row later in the same
# chain records that row's hash (the caller appends it, signed with the node's secret). It
# acts only on the chain of the caller's tenant (the platform's when none is set).
_PRUNE = """
CREATE FUNCTION apix_audit_prune(p_org uuid, p_through_seq bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
AS $$
DECLARE
    through_hash varchar;
    removed bigint;
BEGIN
    -- Owner rights must not reach past the caller's tenant (a superuser owner bypasses RLS).
    IF p_org IS DISTINCT FROM apix_current_org() THEN
        RAISE EXCEPTION 'audit_log: the transaction is not scoped to that chain'
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    SELECT hash INTO through_hash FROM audit_log
    WHERE org_id IS NOT DISTINCT FROM p_org AND seq = p_through_seq;
    IF through_hash IS NULL THEN
        RAISE EXCEPTION 'audit_log: the chain has no row %', p_through_seq
            USING ERRCODE = 'no_data_found';
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM audit_log
        WHERE org_id IS NOT DISTINCT FROM p_org
          AND seq > p_through_seq
          AND action = 'audit.checkpoint' AND source = 'system'
          AND details->>'through_seq' = p_through_seq::text
          AND details->>'through_hash' = through_hash
    ) THEN
        RAISE EXCEPTION 'audit_log: no checkpoint covers row %', p_through_seq
            USING ERRCODE = 'check_violation';
    END IF;
    DELETE FROM audit_log WHERE org_id IS NOT DISTINCT FROM p_org AND seq <= p_through_seq;
    GET DIAGNOSTICS removed = ROW_COUNT;
    RETURN removed;
END
$$
"""


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE audit_log
            ADD COLUMN seq bigint,
            ADD COLUMN prev_hash varchar(64),
            ADD COLUMN hash varchar(64),
            ADD COLUMN source varchar(20) NOT NULL DEFAULT 'app'
        """
    )
    op.execute(_HASH)
    # The owner is itself under the forced policy; lifted while it links every tenant's rows.
    op.execute("ALTER TABLE audit_log NO FORCE ROW LEVEL SECURITY")
    op.execute(_BACKFILL)
    op.execute("ALTER TABLE audit_log FORCE ROW LEVEL SECURITY")
    for column in ("seq", "prev_hash", "hash"):
        op.execute(f"ALTER TABLE audit_log ALTER COLUMN {column} SET NOT NULL")
    # A backstop under the lock: a fork (two rows with one seq) cannot commit. Platform rows
    # (org_id NULL) form one chain, hence NULLS NOT DISTINCT (PostgreSQL 15+).
    op.execute(
        "ALTER TABLE audit_log ADD CONSTRAINT uq_audit_log_org_id_seq "
        "UNIQUE NULLS NOT DISTINCT (org_id, seq)"
    )
    op.execute(
        "CREATE INDEX ix_audit_log_org_id_actor_user_id ON audit_log (org_id, actor_user_id)"
    )
    op.execute(_CHAIN)
    op.execute(
        "CREATE TRIGGER audit_log_chain BEFORE INSERT ON audit_log "
        "FOR EACH ROW EXECUTE FUNCTION apix_audit_chain()"
    )

    op.execute(
        """
        CREATE TABLE audit_setting (
            org_id uuid NOT NULL,
            retention_days integer NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now(),
            CONSTRAINT pk_audit_setting PRIMARY KEY (org_id),
            CONSTRAINT fk_audit_setting_org_id_organization FOREIGN KEY (org_id)
                REFERENCES organization (id) ON DELETE CASCADE,
            CONSTRAINT ck_audit_setting_retention_days CHECK (retention_days >= 1)
        )
        """
    )
    enable_tenant_rls("audit_setting")

    op.execute(_PRUNE)
    op.execute("REVOKE EXECUTE ON FUNCTION apix_audit_prune(uuid, bigint) FROM PUBLIC")


def downgrade() -> None:
    op.execute("DROP FUNCTION apix_audit_prune(uuid, bigint)")
    disable_tenant_rls("audit_setting")
    op.execute("DROP TABLE audit_setting")
    op.execute("DROP TRIGGER audit_log_chain ON audit_log")
    op.execute("DROP FUNCTION apix_audit_chain()")
    op.execute("DROP INDEX ix_audit_log_org_id_actor_user_id")
    op.execute("ALTER TABLE audit_log DROP CONSTRAINT uq_audit_log_org_id_seq")
    op.execute("DROP FUNCTION apix_audit_hash(audit_log)")
    op.execute(
        "ALTER TABLE audit_log DROP COLUMN source, DROP COLUMN hash, "
        "DROP COLUMN prev_hash, DROP COLUMN seq"
    )
