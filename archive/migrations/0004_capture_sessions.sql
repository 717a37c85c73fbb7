-- Fingerprints name the broker session (one connection's consumer) and vhost that wrote them:
-- once a later session of the same vhost has read past the messages the broker requeued
-- from earlier sessions, their fingerprints can no longer match a redelivery and are deleted.
ALTER TABLE rabbit_archive.capture_pending
    ADD COLUMN session_id bigint NOT NULL DEFAULT 0,
    ADD COLUMN vhost text NOT NULL DEFAULT '';
CREATE INDEX capture_pending_session_idx ON rabbit_archive.capture_pending (vhost, session_id);
