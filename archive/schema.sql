-- The canonical schema of rabbit-archive: what archive/migrations/ produce when applied in
-- order (a test checks that the two agree). Read this file to learn the table layout.
CREATE SCHEMA rabbit_archive;

CREATE TABLE rabbit_archive.schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- The archive: one row per captured message, partitioned by capture day so that retention
-- drops whole partitions instead of deleting rows.
CREATE SEQUENCE rabbit_archive.messages_id_seq AS bigint;

CREATE TABLE rabbit_archive.messages (
    id bigint NOT NULL DEFAULT nextval('rabbit_archive.messages_id_seq'),
    captured_at timestamptz NOT NULL DEFAULT now(),
    vhost text NOT NULL,
    exchange text NOT NULL,
    routing_key text NOT NULL,
    -- Set only when a name is not valid UTF-8 or holds NUL: the text columns then hold an
    -- escaped view and these the authoritative bytes.
    exchange_raw bytea,
    routing_key_raw bytea,
    redelivered boolean NOT NULL,
    -- The content header's property flags and values exactly as the broker delivered them
    -- (minus the archive queue's own x-delivery-count): the authoritative properties and
    -- header table, with every AMQP field type.
    properties_raw bytea NOT NULL,
    -- Views for querying; escaped where text cannot hold a value.
    properties jsonb NOT NULL,
    headers jsonb,
    message_id text,
    correlation_id text,
    body bytea NOT NULL,
    body_size integer NOT NULL,
    replay_id text,
    PRIMARY KEY (id, captured_at)
) PARTITION BY RANGE (captured_at);

CREATE INDEX messages_captured_at_idx ON rabbit_archive.messages (captured_at);
CREATE INDEX messages_exchange_idx ON rabbit_archive.messages (exchange, captured_at);

-- A safety net: a row whose day has no partition yet still lands somewhere.
CREATE TABLE rabbit_archive.messages_default PARTITION OF rabbit_archive.messages DEFAULT;

-- Fingerprints of rows committed but not yet known to be acknowledged: a message the
-- broker redelivers after a crash between commit and ack is matched here and not stored twice.
CREATE TABLE rabbit_archive.capture_pending (
    fingerprint bytea NOT NULL,
    batch_id bigint NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX capture_pending_fingerprint_idx ON rabbit_archive.capture_pending (fingerprint);
CREATE INDEX capture_pending_batch_idx ON rabbit_archive.capture_pending (batch_id);

-- Creates the daily partitions of [first_day, first_day + days) that do not exist yet.
CREATE FUNCTION rabbit_archive.ensure_partitions(first_day date, days integer)
RETURNS integer
LANGUAGE plpgsql
AS $$
DECLARE
    day date;
    partition_name text;
    created integer := 0;
BEGIN
    FOR offset_days IN 0 .. days - 1 LOOP
        day := first_day + offset_days;
        partition_name := 'messages_' || to_char(day, 'YYYYMMDD');
        IF to_regclass(format('rabbit_archive.%I', partition_name)) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE rabbit_archive.%I PARTITION OF rabbit_archive.messages '
                'FOR VALUES FROM (%L) TO (%L)',
                partition_name,
                day::timestamp AT TIME ZONE 'UTC',
                (day + 1)::timestamp AT TIME ZONE 'UTC'
            );
            created := created + 1;
        END IF;
    END LOOP;
    RETURN created;
END;
$$;
