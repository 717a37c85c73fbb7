-- Selections by exchange walk archive ids a page at a time (replay/selection.py): with
-- (exchange, id) each page reads exactly its rows, whatever the planner's statistics. Without
-- it, a partition never analysed led PostgreSQL to read a whole day of the (exchange,
-- captured_at) index per page (a replay of 1,000,000 messages of one exchange read the archive at
-- about 11,700 rows/s instead of 85,000). On a large archive this index takes a while to build:
-- capture resumes once it is done, the archive queue holding what arrives meanwhile.
CREATE INDEX messages_exchange_id_idx ON rabbit_archive.messages (exchange, id);
