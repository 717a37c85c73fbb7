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
