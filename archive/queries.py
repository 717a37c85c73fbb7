"""Every SQL statement of rabbit-archive, named; values are always parameters."""

# Redelivered messages whose rows were committed before a crash: consume one pending
# fingerprint per redelivered copy (a multiset match), returning the ones matched.
CLAIM_PENDING = """
WITH wanted AS (
    SELECT fingerprint, count(*) AS copies
    FROM unnest($1::bytea[]) AS fingerprint
    GROUP BY fingerprint
), candidates AS (
    SELECT p.ctid AS row_id,
           row_number() OVER (PARTITION BY p.fingerprint ORDER BY p.created_at) AS rank,
           w.copies
    FROM rabbit_archive.capture_pending AS p
    JOIN wanted AS w ON w.fingerprint = p.fingerprint
)
DELETE FROM rabbit_archive.capture_pending AS p
USING candidates AS c
WHERE p.ctid = c.row_id AND c.rank <= c.copies
RETURNING p.fingerprint
"""

# Batches whose acknowledgement the broker has certainly processed need no fingerprints.
FORGET_PENDING = "DELETE FROM rabbit_archive.capture_pending WHERE batch_id = ANY($1::bigint[])"

# A batch retried after a lost COMMIT reply: its fingerprints exist only if it committed.
BATCH_COMMITTED = "SELECT EXISTS (SELECT 1 FROM rabbit_archive.capture_pending WHERE batch_id = $1)"

ENSURE_PARTITIONS = "SELECT rabbit_archive.ensure_partitions($1::date, $2::integer)"

COUNT_MESSAGES = "SELECT count(*) FROM rabbit_archive.messages"

NEWEST_CAPTURE = "SELECT max(captured_at) FROM rabbit_archive.messages"

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

# The server quotes the partition name (format %I); names come from PARTITIONS_BEFORE.
DROP_PARTITION = "SELECT format('DROP TABLE rabbit_archive.%I', $1::text)"

# Rows that landed in the safety-net partition: few, so deleting them row by row is cheap.
# (Rows of a day partially newer than the cutoff stay until the whole day is older.)
DELETE_OLDER_DEFAULT = "DELETE FROM rabbit_archive.messages_default WHERE captured_at < $1"
