-- The fingerprints of a batch not yet known to be acknowledged go in one row, end to end
-- (16 bytes each), instead of a row each: a row per message cost PostgreSQL as much as the
-- archive row itself (a heap tuple and three index entries written, then deleted and vacuumed),
-- about a sixth of the capture drain's rate. Matching a redelivery reads the few rows of the
-- vhost's other sessions (capture/pending.py). Fingerprints pending at the upgrade are carried
-- over: the lock waits for an old daemon's batch in flight to commit, so that its fingerprints
-- are carried over too (ACCESS EXCLUSIVE at once: taking a weaker lock and then DROP's would
-- deadlock with an old daemon that read the table before writing to it); its next batch fails (the table is gone) and leaves the messages to
-- the broker instead of storing them without fingerprints.
CREATE TABLE rabbit_archive.capture_pending_batches (
    batch_id bigint NOT NULL,
    session_id bigint NOT NULL,
    vhost text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    fingerprints bytea NOT NULL CHECK (octet_length(fingerprints) > 0 AND octet_length(fingerprints) % 16 = 0)
);
-- Random digests do not compress: not trying saves the attempt on every batch.
ALTER TABLE rabbit_archive.capture_pending_batches ALTER COLUMN fingerprints SET STORAGE EXTERNAL;
CREATE INDEX capture_pending_batches_batch_idx ON rabbit_archive.capture_pending_batches (batch_id);
CREATE INDEX capture_pending_batches_session_idx ON rabbit_archive.capture_pending_batches (vhost, session_id);

LOCK TABLE rabbit_archive.capture_pending IN ACCESS EXCLUSIVE MODE;
INSERT INTO rabbit_archive.capture_pending_batches (batch_id, session_id, vhost, created_at, fingerprints)
SELECT batch_id, session_id, vhost, min(created_at), string_agg(fingerprint, ''::bytea ORDER BY created_at)
FROM rabbit_archive.capture_pending
GROUP BY batch_id, session_id, vhost;

DROP TABLE rabbit_archive.capture_pending;
