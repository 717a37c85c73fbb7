-- What the capture daemon did with each exchange in its last discovery round, one row per
-- exchange, so that `rabbit-capture status` (another process) can show refusals and failures.
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
