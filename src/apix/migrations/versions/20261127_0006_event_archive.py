"""event archive: every channel event, partitioned by day, written by `apix worker`

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

from apix.migrations.rls import disable_tenant_rls, enable_tenant_rls

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # The key is the event's stream position, so re-inserting an archived event is a no-op;
    # `created_at` comes from the offset's milliseconds, so a retry lands in the same
    # partition. Offsets are stored as (ms, seq) to order and range over them as numbers.
    op.execute(
        """
        CREATE TABLE apix_event (
            org_id uuid NOT NULL,
            channel varchar(200) NOT NULL,
            epoch varchar(64) NOT NULL,
            offset_ms bigint NOT NULL,
            offset_seq bigint NOT NULL,
            id varchar(64) NOT NULL,
            type varchar(100) NOT NULL,
            payload jsonb,
            metadata jsonb NOT NULL DEFAULT '{}',
            session_id varchar(128),
            ack_state varchar(16) NOT NULL DEFAULT 'none',
            retry_count integer NOT NULL DEFAULT 0,
            created_at timestamptz NOT NULL,
            CONSTRAINT pk_apix_event
                PRIMARY KEY (org_id, channel, epoch, offset_ms, offset_seq, created_at)
        ) PARTITION BY RANGE (created_at)
        """
    )
    op.execute("CREATE INDEX ix_apix_event_org_id_created_at ON apix_event (org_id, created_at)")
    op.execute("CREATE TABLE apix_event_default PARTITION OF apix_event DEFAULT")
    enable_tenant_rls("apix_event")
    # Partitions are made and dropped by the worker through these two functions, which run
    # with the owner's rights: the application role itself can create no table.
    op.execute(
        """
        CREATE FUNCTION apix_event_ensure_partitions(days_ahead integer) RETURNS integer
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
        AS $$
        DECLARE
            day date;
            made integer := 0;
        BEGIN
            FOR day IN SELECT generate_series(current_date - 1, current_date + days_ahead,
                                              interval '1 day')::date LOOP
                IF to_regclass(format('apix_event_p%s', to_char(day, 'YYYYMMDD'))) IS NULL THEN
                    BEGIN
                        EXECUTE format(
                            'CREATE TABLE %I PARTITION OF apix_event '
                            'FOR VALUES FROM (%L) TO (%L)',
                            format('apix_event_p%s', to_char(day, 'YYYYMMDD')),
                            day::timestamptz, (day + 1)::timestamptz);
                        made := made + 1;
                    EXCEPTION WHEN check_violation THEN
                        -- The default partition already holds rows of that day: they stay
                        -- there (still archived, still read) and the day has no partition.
                        RAISE NOTICE 'apix_event: no partition for %', day;
                    END;
                END IF;
            END LOOP;
            RETURN made;
        END
        $$
        """
    )
    op.execute(
        """
        CREATE FUNCTION apix_event_drop_partitions(keep_days integer) RETURNS integer
        LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp
        AS $$
        DECLARE
            part record;
            dropped integer := 0;
        BEGIN
            keep_days := greatest(keep_days, 1);
            FOR part IN
                SELECT c.relname FROM pg_inherits i
                JOIN pg_class c ON c.oid = i.inhrelid
                WHERE i.inhparent = 'apix_event'::regclass
                  AND c.relname ~ '^apix_event_p[0-9]{8}$'
                  AND to_date(substr(c.relname, 13), 'YYYYMMDD') < current_date - keep_days
            LOOP
                EXECUTE format('DROP TABLE %I', part.relname);
                dropped := dropped + 1;
            END LOOP;
            DELETE FROM apix_event_default
            WHERE created_at < (current_date - keep_days)::timestamptz;
            RETURN dropped;
        END
        $$
        """
    )
    for function in ("apix_event_ensure_partitions", "apix_event_drop_partitions"):
        op.execute(f"REVOKE EXECUTE ON FUNCTION {function}(integer) FROM PUBLIC")
    op.execute("SELECT apix_event_ensure_partitions(7)")


def downgrade() -> None:
    op.execute("DROP FUNCTION apix_event_drop_partitions(integer)")
    op.execute("DROP FUNCTION apix_event_ensure_partitions(integer)")
    disable_tenant_rls("apix_event")
    op.execute("DROP TABLE apix_event")
