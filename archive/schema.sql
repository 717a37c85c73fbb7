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
-- Selections by exchange walk ids a page at a time: each page reads exactly its rows.
CREATE INDEX messages_exchange_id_idx ON rabbit_archive.messages (exchange, id);

-- A safety net: a row whose day has no partition yet still lands somewhere.
CREATE TABLE rabbit_archive.messages_default PARTITION OF rabbit_archive.messages DEFAULT;

-- Fingerprints of rows committed but not yet known to be acknowledged: a message the
-- broker redelivers after a crash between commit and ack is matched here and not stored twice.
-- One row per batch (batch_id), its messages' 16-byte fingerprints end to end; session_id and
-- vhost name the broker session whose batch wrote or last matched them (see capture/acks.py).
CREATE TABLE rabbit_archive.capture_pending_batches (
    batch_id bigint NOT NULL,
    session_id bigint NOT NULL,
    vhost text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    fingerprints bytea NOT NULL CHECK (octet_length(fingerprints) > 0 AND octet_length(fingerprints) % 16 = 0)
);
ALTER TABLE rabbit_archive.capture_pending_batches ALTER COLUMN fingerprints SET STORAGE EXTERNAL;
CREATE INDEX capture_pending_batches_batch_idx ON rabbit_archive.capture_pending_batches (batch_id);
CREATE INDEX capture_pending_batches_session_idx ON rabbit_archive.capture_pending_batches (vhost, session_id);

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

-- Replay: indexes for its id filters, a JSON reader for body filters that never fails, and
-- the history of replays with their confirmed cursors.
CREATE INDEX messages_message_id_idx ON rabbit_archive.messages (message_id)
    WHERE message_id IS NOT NULL;
CREATE INDEX messages_correlation_id_idx ON rabbit_archive.messages (correlation_id)
    WHERE correlation_id IS NOT NULL;

-- The body as jsonb, or NULL when it is not a JSON object or array in UTF-8, so that a
-- --body-json filter skips binary and malformed bodies instead of failing the query.
CREATE FUNCTION rabbit_archive.body_json(body bytea)
RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE
AS $$
DECLARE
    first_byte integer;
BEGIN
    -- Only bodies that start like a JSON object or array (after whitespace) are parsed.
    first_byte := get_byte(ltrim(body, '\x20090a0d'::bytea), 0);
    IF first_byte NOT IN (123, 91) THEN
        RETURN NULL;
    END IF;
    RETURN convert_from(body, 'UTF8')::jsonb;
EXCEPTION WHEN OTHERS THEN
    RETURN NULL;
END;
$$;

-- One row per replay; `confirmed_cursor` is the last archive id (or file line) whose publish the
-- broker confirmed, with every earlier one confirmed too: resume continues after it.
CREATE TABLE rabbit_archive.replays (
    id text PRIMARY KEY,
    status text NOT NULL CHECK (status IN ('running', 'completed', 'incomplete', 'interrupted', 'failed')),
    filters jsonb NOT NULL,
    target jsonb NOT NULL,
    options jsonb NOT NULL,
    operator text NOT NULL,
    reason text,
    upto_id bigint,
    selected bigint NOT NULL,
    published bigint NOT NULL DEFAULT 0,
    confirmed bigint NOT NULL DEFAULT 0,
    returned bigint NOT NULL DEFAULT 0,
    nacked bigint NOT NULL DEFAULT 0,
    confirmed_cursor bigint NOT NULL DEFAULT 0,
    error text,
    started_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    -- Positions the broker nacked or returned (resume sends them again), and the last position
    -- such that it and every earlier one were answered (NULL: the same as confirmed_cursor).
    failed_ids bigint[] NOT NULL DEFAULT '{}',
    settled_cursor bigint,
    -- Messages that could not be republished at all (see the log).
    skipped bigint NOT NULL DEFAULT 0,
    -- Archive ids retention dropped before a follower reached them: [{"from", "until", "at"}].
    follow_gaps jsonb NOT NULL DEFAULT '[]',
    -- Of the skipped, `--to-origin` messages without x-death (reported, not a failure).
    without_death bigint NOT NULL DEFAULT 0
);
CREATE INDEX replays_started_at_idx ON rabbit_archive.replays (started_at);
-- A follower's name (`run --follow --name`) is one durable position.
CREATE UNIQUE INDEX replays_follower_name_idx ON rabbit_archive.replays ((options ->> 'name'))
    WHERE options ->> 'name' IS NOT NULL;

-- What the capture daemon did with each exchange in its last discovery round, one row per
-- exchange, so that `rabbit-capture status` (another process) can show refusals and failures.
-- `updated_at` is when the row last changed, so it reads "in this state since".
CREATE TABLE rabbit_archive.binding_state (
    vhost text NOT NULL,
    exchange text NOT NULL,
    type text NOT NULL,
    -- 'bound', 'skipped', 'refused', 'unrepresentable' or 'failed'.
    state text NOT NULL,
    reason text NOT NULL DEFAULT '',
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (vhost, exchange)
);

-- What the archive holds and does not hold over time, per vhost and exchange (exchange NULL:
-- the whole vhost): each row is a change of state ('bound', 'skipped', 'refused', 'failed',
-- 'unrepresentable', 'gone' for an exchange; 'source' and 'unavailable'/'available' for a
-- vhost) or a count of messages lost to the archive ('dropped', with `messages`).
CREATE TABLE rabbit_archive.coverage_events (
    id bigserial PRIMARY KEY,
    at timestamptz NOT NULL DEFAULT now(),
    vhost text NOT NULL,
    exchange text,
    event text NOT NULL,
    reason text NOT NULL DEFAULT '',
    messages bigint
);
CREATE INDEX coverage_events_at_idx ON rabbit_archive.coverage_events (vhost, exchange, at);
