"""`rabbit-replay web`: a read-only console to search, read and preview replays of the archive."""
