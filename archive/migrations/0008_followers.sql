-- Followers (`rabbit-replay run --follow --name NAME`): a name is one durable position, so no
-- two replays may carry the same one; the archive ids that retention dropped before a follower
-- reached them are kept with it (objects {"from", "until", "at"}), so that the gap is reported,
-- never silently skipped.
CREATE UNIQUE INDEX replays_follower_name_idx ON rabbit_archive.replays ((options ->> 'name'))
    WHERE options ->> 'name' IS NOT NULL;
ALTER TABLE rabbit_archive.replays ADD COLUMN follow_gaps jsonb NOT NULL DEFAULT '[]';
