-- How many messages of a replay could not be republished at all (a message the client
-- cannot encode, see the log), kept with the other counts so that `history` shows them and a
-- resume continues the count.
ALTER TABLE rabbit_archive.replays ADD COLUMN skipped bigint NOT NULL DEFAULT 0;
