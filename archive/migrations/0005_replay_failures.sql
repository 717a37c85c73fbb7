-- Replays whose messages the broker nacked or returned as unroutable end 'incomplete'; the
-- positions (archive ids, or file lines) of those messages are kept so that `resume` sends
-- exactly them again, then continues after `settled_cursor`: the last position such that it
-- and every earlier one were answered by the broker (confirmed, nacked or returned).
-- `confirmed_cursor` stays before the first message not confirmed as routed.
ALTER TABLE rabbit_archive.replays
    DROP CONSTRAINT replays_status_check,
    ADD CONSTRAINT replays_status_check
        CHECK (status IN ('running', 'completed', 'incomplete', 'interrupted', 'failed')),
    ADD COLUMN failed_ids bigint[] NOT NULL DEFAULT '{}',
    ADD COLUMN settled_cursor bigint;
