-- How many of a replay's skipped messages were `--to-origin` messages without x-death (nothing
-- to send them home to: reported, not a failure), so that a resume does not count them as
-- messages that could not be republished.
ALTER TABLE rabbit_archive.replays ADD COLUMN without_death bigint NOT NULL DEFAULT 0;
