"""Every SQL statement of rabbit-archive, named; values are always parameters."""

# Pending fingerprints (capture/pending.py): one row per batch, its fingerprints end to end.
#
# A redelivered message whose row was committed before a crash is matched against the pending
# fingerprints of the vhost's earlier broker sessions ($1 vhost, $2 the current session), one
# per redelivered copy, oldest batch first. Rows written before migration 0004 have no vhost
# (''): they are read too, as the fingerprint itself holds the vhost. Matching is done on the
# rows as read, then again on the rows that matched, locked ($3 their batch ids) until the batch
# commits: only those, so that two daemons of a vhost do not lock each other's every row. A
# matched fingerprint is not deleted but moves to the current batch's row: if this batch's ack
# is lost too, the next redelivery still finds it; and a copy delivered in this session can
# only come back in a later one.
PENDING_OF_OTHER_SESSIONS = """
SELECT batch_id, fingerprints FROM rabbit_archive.capture_pending_batches
WHERE (vhost = $1::text OR vhost = '') AND session_id <> $2::bigint
ORDER BY created_at, batch_id
"""
PENDING_LOCK = """
SELECT ctid, fingerprints FROM rabbit_archive.capture_pending_batches
WHERE batch_id = ANY($3::bigint[]) AND (vhost = $1::text OR vhost = '') AND session_id <> $2::bigint
ORDER BY created_at, batch_id
FOR UPDATE
"""
PENDING_KEEP = """
UPDATE rabbit_archive.capture_pending_batches SET fingerprints = $2::bytea WHERE ctid = $1::tid
"""
PENDING_DROP = "DELETE FROM rabbit_archive.capture_pending_batches WHERE ctid = $1::tid"

# The fingerprints a batch stored or matched ($4, end to end).
PENDING_ADD = """
INSERT INTO rabbit_archive.capture_pending_batches (batch_id, session_id, vhost, fingerprints)
VALUES ($1::bigint, $2::bigint, $3::text, $4::bytea)
"""

# Batches whose acknowledgement the broker has certainly processed need no fingerprints.
FORGET_PENDING = "DELETE FROM rabbit_archive.capture_pending_batches WHERE batch_id = ANY($1::bigint[])"

# Fingerprints of the vhost's earlier broker sessions ($1 vhost, $2 the current session): the
# current session has read past every message the broker requeued from them.
FORGET_OTHER_SESSIONS = """
DELETE FROM rabbit_archive.capture_pending_batches WHERE vhost = $1::text AND session_id <> $2::bigint
"""

# A batch retried after a lost COMMIT reply: its fingerprints (written or matched) exist only if it committed.
BATCH_COMMITTED = "SELECT EXISTS (SELECT 1 FROM rabbit_archive.capture_pending_batches WHERE batch_id = $1)"

# --- schema and database (archive/migrate.py, archive/db.py) -------------------------------

# One lock for the whole product: replicas starting together apply the migrations in turn.
# The product's advisory lock keys in the one-bigint space are 0x72616262697400NN ("rabbit\0"
# and a number): 01 migrations, 02 partitions, 03 the selection fence.
MIGRATION_LOCK = "SELECT pg_advisory_xact_lock(8241976967880245249)"

MIGRATIONS_BOOTSTRAP = """
CREATE SCHEMA IF NOT EXISTS rabbit_archive;
CREATE TABLE IF NOT EXISTS rabbit_archive.schema_migrations (
    version integer PRIMARY KEY,
    name text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
"""

APPLIED_MIGRATIONS = "SELECT version FROM rabbit_archive.schema_migrations"

RECORD_MIGRATION = "INSERT INTO rabbit_archive.schema_migrations (version, name) VALUES ($1, $2)"

SCHEMA_EXISTS = "SELECT to_regclass('rabbit_archive.schema_migrations') IS NOT NULL"

SCHEMA_VERSION = "SELECT max(version) FROM rabbit_archive.schema_migrations"

# The server quotes the identifier (format %I): no database name is ever spliced in by hand.
CREATE_DATABASE = "SELECT format('CREATE DATABASE %I', $1::text)"

CURRENT_USER = "SELECT current_user"

NOW = "SELECT now()"

# Which of the privileges ($1 privileges, $2 tables of schema rabbit_archive, in pairs) the
# current role lacks, USAGE on the schema first. By object id, so that a role without USAGE
# on the schema gets the whole list, not an error.
MISSING_PRIVILEGES = """
SELECT missing FROM (
    SELECT 0::bigint AS position, 'USAGE on schema rabbit_archive' AS missing
    FROM pg_namespace AS n
    WHERE n.nspname = 'rabbit_archive' AND NOT has_schema_privilege(n.oid, 'USAGE')
    UNION ALL
    SELECT w.position, w.privilege || ' on rabbit_archive.' || w.relname
    FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS w(privilege, relname, position)
    JOIN pg_namespace AS n ON n.nspname = 'rabbit_archive'
    JOIN pg_class AS c ON c.relnamespace = n.oid AND c.relname = w.relname
    WHERE NOT has_table_privilege(c.oid, w.privilege)
) AS found
ORDER BY position
"""

# --- the selection watermark ----------------------------------------------------------------
#
# Archive ids are taken at COPY time but become visible in commit order: with two capture
# transactions in flight, a lower id can commit after a reader saw a higher one. So every
# capture transaction holds this lock shared from before its first id until its commit, and
# a reader that fixes a selection takes it exclusively for one statement: it waits for the
# transactions in flight to commit, and any transaction that starts after it takes ids, and
# capture times, above what the reader saw. (A key of its own in the one-bigint key space;
# the replay locks use the two-integer space.)

# A capture transaction's first statement: the fence, then the capture time of its rows,
# read after the fence so that it is later than any watermark fixed before it (the
# MATERIALIZED CTE runs first, so the time is taken once the lock is held). It also announces
# the batch ($1 the vhost) on CAPTURED_CHANNEL: PostgreSQL delivers the notification only if and
# when the transaction commits, so a follower (`run --follow`) wakes on committed rows only.
CAPTURED_CHANNEL = "rabbit_archive_captured"
FENCE_CAPTURE = """
WITH fence AS MATERIALIZED (SELECT pg_advisory_xact_lock_shared(8241976967880245251))
SELECT clock_timestamp(), pg_notify('rabbit_archive_captured', $1::text) FROM fence
"""

# In a batch written beside another (capture/consumer.py), before its fence: the second waits, in
# the daemon, for the first to commit, so PostgreSQL cannot see a cycle through that wait (the first
# queued behind a partition's DDL that queues behind the second). A lock wait this long fails the
# attempt instead; the second then rolls back, and both are retried in order.
BESIDE_LOCK_TIMEOUT = "SET LOCAL lock_timeout = '5s'"

# A batch's ids taken in one statement, right after the fence: the batch written next starts only
# once this returned, so its ids are all higher even when it commits first (capture/store.py).
TAKE_IDS = "SELECT nextval('rabbit_archive.messages_id_seq') FROM generate_series(1, $1::integer)"

# Inside a short transaction of the reader: wait at most this long for capture
# transactions in flight (one that never ends is the daemon's trouble, not a reason to hang).
FENCE_TIMEOUT = "SET LOCAL lock_timeout = '30s'"
FENCE_SELECTION = "SELECT pg_advisory_xact_lock(8241976967880245251)"

# Read with the fence held: no transaction that could still commit a lower id is in flight.
NEWEST_ID = "SELECT coalesce(max(id), 0) FROM rabbit_archive.messages"

# --- filter conditions (replay/filters.py joins them with AND) -----------------------------
#
# Each {} is the $n placeholder of a value, never the value itself.
FILTER_EXCHANGES = "exchange = ANY({}::text[])"
FILTER_VHOSTS = "vhost = ANY({}::text[])"
FILTER_ROUTING_KEY = "routing_key = {}::text"
# A topic pattern as a regular expression over "." + the routing key (see filters.topic_regex).
FILTER_ROUTING_PATTERN = "(CASE WHEN routing_key = '' THEN '' ELSE '.' || routing_key END) ~ {}::text"
# A row captured before $1 (--since minus the capture margin), the latest by time: every row
# captured from --since on has a higher id (CAPTURE_MARGIN, capture/store.py). One probe of the
# captured_at index per partition, whatever the statistics.
SELECTION_ID_FLOOR = """
SELECT id FROM rabbit_archive.messages WHERE captured_at < $1::timestamptz ORDER BY captured_at DESC LIMIT 1
"""
# A row captured after $1 (--until plus the margin), the earliest: every row captured before
# --until has a lower id.
SELECTION_ID_CEILING = """
SELECT id FROM rabbit_archive.messages WHERE captured_at > $1::timestamptz ORDER BY captured_at LIMIT 1
"""

FILTER_SINCE = "captured_at >= {}::timestamptz"
FILTER_UNTIL = "captured_at < {}::timestamptz"
FILTER_FROM_ID = "id >= {}::bigint"
FILTER_TO_ID = "id <= {}::bigint"
FILTER_AFTER_ID = "id > {}::bigint"
# `?` lets an index on headers help; `->>` compares the text form of any JSON value, so
# --header attempt=3 matches the integer 3 and the string "3" alike.
FILTER_HEADER = "headers ? {0}::text AND headers ->> {0}::text = {1}::text"
FILTER_MESSAGE_ID = "message_id = {}::text"
FILTER_CORRELATION_ID = "correlation_id = {}::text"
# Bytes, not LIKE: quotes, %, _ and backslashes are plain text to match.
FILTER_BODY_CONTAINS = "position({}::bytea IN body) > 0"
FILTER_BODY_JSON = "rabbit_archive.body_json(body) #>> {}::text[] = {}::text"
FILTER_NOT_A_REPLAY = "replay_id IS NULL"
# The most recent x-death entry is the first (RabbitMQ moves an entry to the front when it updates it).
FILTER_DEAD_LETTERED_FROM = "headers -> 'x-death' -> 0 ->> 'queue' = {}::text"
FILTER_DEATH_REASON = "headers -> 'x-death' -> 0 ->> 'reason' = {}::text"

# --- reading the archive (replay/selection.py) -------------------------------------------
#
# {where} is always replay.filters.where_clause's output (fixed fragments with $n values) and
# {limit} an integer the code chose.

# One page's ids, sizes and capture times; the caller bounds it by an id window.
SELECTION_PAGE_IDS = """
SELECT id, body_size, captured_at FROM rabbit_archive.messages WHERE {where} ORDER BY id LIMIT {limit}
"""

# The columns of ArchivedMessage (replay/selection.py), in its fields' order; {views} the JSON views.
_MESSAGE_SELECT_WITH = """
SELECT id, captured_at, vhost, exchange, routing_key, exchange_raw, routing_key_raw, redelivered,
       properties_raw, {views}, body, body_size, replay_id
FROM rabbit_archive.messages
"""
_MESSAGE_SELECT = _MESSAGE_SELECT_WITH.format(views="properties, headers")

# A page's rows ($1 ids) between its first and last capture times ($2, $3): the bounds let
# PostgreSQL skip every daily partition the page does not touch (at plan time, or at run
# time with a generic plan), where `id = ANY` alone probes each partition's index per id.
_PAGE_ROWS_WHERE = (
    "WHERE id = ANY($1::bigint[]) AND captured_at >= $2::timestamptz AND captured_at <= $3::timestamptz"
    " ORDER BY id"
)
SELECTION_PAGE_ROWS = _MESSAGE_SELECT + _PAGE_ROWS_WHERE

# The same rows for publishing them again: without the JSON views, which a replay never reads
# (decoding them took a tenth of a replay's time).
SELECTION_PAGE_ROWS_TO_SEND = (
    _MESSAGE_SELECT_WITH.format(views="'{}'::jsonb AS properties, NULL::jsonb AS headers") + _PAGE_ROWS_WHERE
)

ONE_MESSAGE = _MESSAGE_SELECT + "WHERE id = $1::bigint"

SELECTION_COUNT = "SELECT count(*) FROM rabbit_archive.messages WHERE {where}"

SELECTION_BREAKDOWN = """
SELECT vhost, exchange, routing_key, count(*) AS messages, coalesce(sum(body_size), 0) AS bytes,
       exchange_raw
FROM rabbit_archive.messages WHERE {where}
GROUP BY vhost, exchange, routing_key, exchange_raw
ORDER BY messages DESC, vhost, exchange, routing_key
"""

# Taken by whoever creates partitions (the daemon's replicas), so that they do it in turn.
PARTITION_LOCK = "SELECT pg_advisory_xact_lock(8241976967880245250)"

ENSURE_PARTITIONS = "SELECT rabbit_archive.ensure_partitions($1::date, $2::integer)"

COUNT_MESSAGES = "SELECT count(*) FROM rabbit_archive.messages"

NEWEST_CAPTURE = "SELECT max(captured_at) FROM rabbit_archive.messages"

# Rows and body bytes per vhost and exchange over the last hour and day (the day's partitions only).
RECENT_BY_EXCHANGE = """
SELECT vhost, exchange,
       count(*) FILTER (WHERE captured_at > now() - interval '1 hour') AS rows_last_hour,
       coalesce(sum(body_size) FILTER (WHERE captured_at > now() - interval '1 hour'), 0) AS bytes_last_hour,
       count(*) AS rows_last_day,
       coalesce(sum(body_size), 0) AS bytes_last_day
FROM rabbit_archive.messages
WHERE captured_at > now() - interval '1 day'
GROUP BY vhost, exchange
ORDER BY vhost, exchange
"""

# Daily partitions entirely older than the cutoff, oldest first.
PARTITIONS_BEFORE = """
SELECT c.relname
FROM pg_inherits AS i
JOIN pg_class AS c ON c.oid = i.inhrelid
JOIN pg_namespace AS n ON n.oid = c.relnamespace
WHERE i.inhparent = 'rabbit_archive.messages'::regclass
  AND c.relname ~ '^messages_[0-9]{8}$'
  AND to_date(substr(c.relname, 10), 'YYYYMMDD') + 1 <= ($1::timestamptz AT TIME ZONE 'UTC')::date
ORDER BY c.relname
"""

# Daily partitions whose day is over ($1 now) and that were never analysed (reltuples -1), or
# hold rows without column statistics: autovacuum may be off or behind, and a plan on a large
# partition without statistics can be a full scan.
CLOSED_PARTITIONS_WITHOUT_STATISTICS = """
SELECT c.relname
FROM pg_inherits AS i
JOIN pg_class AS c ON c.oid = i.inhrelid
WHERE i.inhparent = 'rabbit_archive.messages'::regclass
  AND c.relname ~ '^messages_[0-9]{8}$'
  AND to_date(substr(c.relname, 10), 'YYYYMMDD') + 1 <= ($1::timestamptz AT TIME ZONE 'UTC')::date
  AND (c.reltuples < 0 OR (c.reltuples > 0 AND NOT EXISTS (
      SELECT 1 FROM pg_stats AS s WHERE s.schemaname = 'rabbit_archive' AND s.tablename = c.relname
  )))
ORDER BY c.relname
"""
ANALYZE_PARTITION = "SELECT format('ANALYZE rabbit_archive.%I', $1::text)"

# The server quotes the partition name (format %I); names come from PARTITIONS_BEFORE.
DROP_PARTITION = "SELECT format('DROP TABLE rabbit_archive.%I', $1::text)"

# Rows that landed in the safety-net partition: few, so deleting them row by row is cheap.
# (Rows of a day partially newer than the cutoff stay until the whole day is older.)
DELETE_OLDER_DEFAULT = "DELETE FROM rabbit_archive.messages_default WHERE captured_at < $1"

# --- replay history -------------------------------------------------------------------

# Held (as a session-level advisory lock on (class, hashtext(replay id))) by the process
# running a replay: a 'running' row whose lock nobody holds was interrupted (SIGKILL, lost
# connection), and two processes can never run the same replay at once.
REPLAY_LOCK_CLASS = 1380012624  # 0x52415250; written out in the statements below

TRY_LOCK_REPLAY = "SELECT pg_try_advisory_lock(1380012624, hashtext($1::text))"

# Every column of a replay row; status reads 'interrupted' for a 'running' row whose lock
# no session holds.
_REPLAY_SELECT = """
SELECT r.id,
       CASE WHEN r.status = 'running' AND NOT EXISTS (
           SELECT 1 FROM pg_locks AS l
           WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
             AND l.classid = 1380012624::oid
             AND l.objid::text::bigint = (hashtext(r.id)::bigint & 4294967295)
       ) THEN 'interrupted' ELSE r.status END AS status,
       r.filters, r.target, r.options, r.operator, r.reason, r.upto_id, r.selected, r.published,
       r.confirmed, r.returned, r.nacked, r.skipped, r.without_death, r.follow_gaps, r.confirmed_cursor,
       r.error, r.started_at, r.updated_at, r.finished_at
FROM rabbit_archive.replays AS r
"""

INSERT_REPLAY = """
INSERT INTO rabbit_archive.replays
    (id, status, filters, target, options, operator, reason, upto_id, selected)
VALUES ($1, 'running', $2, $3, $4, $5, $6, $7, $8)
"""

GET_REPLAY = _REPLAY_SELECT + "WHERE r.id = $1"

LIST_REPLAYS = _REPLAY_SELECT + "ORDER BY r.started_at, r.id"

SAVE_REPLAY_PROGRESS = """
UPDATE rabbit_archive.replays
SET published = $2, confirmed = $3, returned = $4, nacked = $5, skipped = $6, confirmed_cursor = $7,
    without_death = $8,
    updated_at = now()
WHERE id = $1
"""

FINISH_REPLAY = """
UPDATE rabbit_archive.replays
SET status = $2, error = $3, finished_at = now(), updated_at = now()
WHERE id = $1
"""

RESTART_REPLAY = """
UPDATE rabbit_archive.replays
SET status = 'running', error = NULL, finished_at = NULL, updated_at = now()
WHERE id = $1
"""

# The positions a replay's broker nacked or returned, and where a resume continues (the last
# position answered with every earlier one); separate from the columns above (migration 0005).
SAVE_REPLAY_FAILURES = """
UPDATE rabbit_archive.replays
SET failed_ids = $2::bigint[], settled_cursor = $3, updated_at = now()
WHERE id = $1
"""

# Followers (`run --follow`): the replay row of a name, and where retention cut a follower's way.
FOLLOWER_BY_NAME = "SELECT id FROM rabbit_archive.replays WHERE options ->> 'name' = $1"

RECORD_FOLLOW_GAP = """
UPDATE rabbit_archive.replays
SET follow_gaps = follow_gaps || $2::text::jsonb, updated_at = now()
WHERE id = $1
"""

OLDEST_ID = "SELECT min(id) FROM rabbit_archive.messages"

# Options written as a JSON string (history.create's json.dumps through the jsonb codec) are
# read back as the object they hold before the keys are added.
MERGE_REPLAY_OPTIONS = """
UPDATE rabbit_archive.replays
SET options = (CASE WHEN jsonb_typeof(options) = 'string' THEN (options #>> '{}')::jsonb ELSE options END)
              || $2::jsonb,
    updated_at = now()
WHERE id = $1
"""

GET_REPLAY_FAILURES = """
SELECT id, failed_ids, settled_cursor FROM rabbit_archive.replays WHERE ($1::text IS NULL OR id = $1)
"""

# --- binding state (what the daemon did with each exchange) ------------------------------

# Replace a vhost's rows ($1) with the given exchanges, types, states and reasons (arrays of
# equal length) in one statement: rows of exchanges not given are deleted, the others upserted.
# A row is rewritten only when something changed, so `updated_at` reads "in this state since".
# A name given twice counts once (the last one wins).
SAVE_BINDING_STATE = """
WITH given AS (
    SELECT DISTINCT ON (s.exchange) s.exchange, s.type, s.state, s.reason
    FROM unnest($2::text[], $3::text[], $4::text[], $5::text[]) WITH ORDINALITY
        AS s(exchange, type, state, reason, position)
    ORDER BY s.exchange, s.position DESC
), gone AS (
    DELETE FROM rabbit_archive.binding_state AS b
    WHERE b.vhost = $1::text AND NOT EXISTS (SELECT 1 FROM given AS g WHERE g.exchange = b.exchange)
)
INSERT INTO rabbit_archive.binding_state AS b (vhost, exchange, type, state, reason)
SELECT $1::text, g.exchange, g.type, g.state, coalesce(g.reason, '') FROM given AS g
ON CONFLICT (vhost, exchange) DO UPDATE
SET type = excluded.type, state = excluded.state, reason = excluded.reason, updated_at = now()
WHERE (b.type, b.state, b.reason) IS DISTINCT FROM (excluded.type, excluded.state, excluded.reason)
"""

# The recorded rows of some vhosts ($1).
BINDING_STATE = """
SELECT vhost, exchange, type, state, reason, updated_at
FROM rabbit_archive.binding_state
WHERE vhost = ANY($1::text[])
ORDER BY vhost, exchange
"""

# Whether the binding_state table exists (schema version 3 or later).
BINDING_STATE_EXISTS = "SELECT to_regclass('rabbit_archive.binding_state') IS NOT NULL"

# --- coverage (what the archive does not hold, over time) ---------------------------------

# Append coverage events: arrays of vhosts, exchanges (NULL for the vhost), events, reasons,
# message counts (NULL where not counted) and times, one statement.
RECORD_COVERAGE = """
INSERT INTO rabbit_archive.coverage_events (vhost, exchange, event, reason, messages, at)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::timestamptz[])
"""

# The newest recorded state of each exchange of a vhost (dropped counts are not states).
LATEST_EXCHANGE_STATES = """
SELECT DISTINCT ON (exchange) exchange, event, reason
FROM rabbit_archive.coverage_events
WHERE vhost = $1 AND exchange IS NOT NULL AND event <> 'dropped'
ORDER BY exchange, at DESC, id DESC
"""

# Coverage events that matter for a window: every event inside it plus, per vhost and
# exchange, the last state before it ($1 from, $2 until).
COVERAGE_EVENTS = """
(SELECT DISTINCT ON (vhost, exchange, event IN ('source', 'unavailable', 'available'))
        vhost, exchange, event, reason, messages, at
 FROM rabbit_archive.coverage_events
 WHERE at < $1 AND event <> 'dropped'
 ORDER BY vhost, exchange, event IN ('source', 'unavailable', 'available'), at DESC, id DESC)
UNION ALL
(SELECT vhost, exchange, event, reason, messages, at
 FROM rabbit_archive.coverage_events
 WHERE at >= $1 AND at < $2)
ORDER BY at
"""

# Coverage history older than the retention cutoff ($1) goes with the messages it describes,
# except each exchange's and vhost's last state, which still holds after the cutoff.
PRUNE_COVERAGE = """
DELETE FROM rabbit_archive.coverage_events AS e
WHERE e.at < $1
  AND (e.event = 'dropped' OR EXISTS (
      SELECT 1 FROM rabbit_archive.coverage_events AS later
      WHERE later.vhost = e.vhost AND later.exchange IS NOT DISTINCT FROM e.exchange
        AND later.event <> 'dropped' AND (later.at, later.id) > (e.at, e.id)
        AND (later.event IN ('source', 'unavailable', 'available'))
            = (e.event IN ('source', 'unavailable', 'available'))))
"""

# Whether coverage_events exists (schema version 6 or later) and the user may read it.
COVERAGE_EXISTS = """
SELECT CASE WHEN to_regclass('rabbit_archive.coverage_events') IS NULL THEN false
            ELSE has_table_privilege('rabbit_archive.coverage_events', 'SELECT') END
"""

# For `status`: messages dropped in the last hour per vhost and exchange, and vhosts whose
# newest state is 'unavailable' ($1 the vhosts).
RECENT_LOSSES = """
SELECT vhost, exchange, 'dropped: QUEUE_MAX_BYTES reached in the last hour' AS reason,
       sum(messages)::bigint AS messages
FROM rabbit_archive.coverage_events
WHERE event = 'dropped' AND at > now() - interval '1 hour' AND vhost = ANY($1::text[])
GROUP BY vhost, exchange
UNION ALL
SELECT vhost, NULL, 'vhost not captured: ' || reason, NULL
FROM (
    SELECT DISTINCT ON (vhost) vhost, event, reason
    FROM rabbit_archive.coverage_events
    WHERE exchange IS NULL AND event IN ('unavailable', 'available') AND vhost = ANY($1::text[])
    ORDER BY vhost, at DESC, id DESC
) AS latest
WHERE event = 'unavailable'
"""

# The oldest capture time in the archive (where a coverage window without --since starts).
OLDEST_CAPTURE = "SELECT min(captured_at) FROM rabbit_archive.messages"

# --- the web console (replay/web/) --------------------------------------------------------
#
# {where} is replay.filters.where_clause's output, as above; {width} a bar width in seconds
# that the console chose from a fixed list (replay/web/views.py).

# Where the traffic chart of a selection without `since` starts.
WEB_FIRST_CAPTURE = "SELECT min(captured_at) FROM rabbit_archive.messages WHERE {where}"

# Messages per exchange per bar; bars are numbered from the epoch, so they fall on round times.
WEB_TRAFFIC = """
SELECT exchange, floor(extract(epoch FROM captured_at) / {width})::bigint AS bar, count(*) AS messages
FROM rabbit_archive.messages WHERE {where}
GROUP BY exchange, bar
"""

# /healthz: the database answers.
WEB_PING = "SELECT 1"

# One message with at most $2 bytes of its body (its body_size is the whole size): a message
# page never holds a 64 MB body to show its first 64 KiB.
WEB_MESSAGE = """
SELECT id, captured_at, vhost, exchange, routing_key, exchange_raw, routing_key_raw, redelivered,
       properties_raw, properties, headers, substring(body FROM 1 FOR $2::integer) AS body, body_size,
       replay_id
FROM rabbit_archive.messages WHERE id = $1::bigint
"""

# $3 bytes of a message's body from byte $2 (1-based): a download is streamed in such slices.
WEB_BODY_SLICE = """
SELECT substring(body FROM $2::integer FOR $3::integer) FROM rabbit_archive.messages WHERE id = $1::bigint
"""

# --- preflight (`rabbit-capture check`, capture/preflight.py): read only ------------------------

SERVER_VERSION = "SELECT current_setting('server_version_num')::integer, current_setting('server_version')"

# The capture role's rights on the current database: CREATE on it (CREATE SCHEMA IF NOT EXISTS
# asks for it even when the schema exists) and, once they exist, ownership of schema
# rabbit_archive and of its messages table (only the owner creates and drops partitions).
# Membership in the owning role counts, as PostgreSQL counts it.
CAPTURE_RIGHTS = """
SELECT current_user AS role,
       current_database() AS database,
       has_database_privilege(current_database(), 'CREATE') AS can_create,
       n.oid IS NOT NULL AS schema_exists,
       coalesce(pg_has_role(n.nspowner, 'USAGE'), true) AS owns_schema,
       pg_get_userbyid(n.nspowner) AS schema_owner,
       coalesce(pg_has_role(c.relowner, 'USAGE'), true) AS owns_messages,
       pg_get_userbyid(c.relowner) AS messages_owner
FROM (SELECT 1) AS one
LEFT JOIN pg_namespace AS n ON n.nspname = 'rabbit_archive'
LEFT JOIN pg_class AS c ON c.relnamespace = n.oid AND c.relname = 'messages'
"""

# Whether the role may create the database that the daemon creates at its first start.
MAY_CREATE_DATABASE = "SELECT rolcreatedb OR rolsuper FROM pg_roles WHERE rolname = current_user"
