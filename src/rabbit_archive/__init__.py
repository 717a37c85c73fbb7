"""rabbit-archive: records every message of a RabbitMQ broker in PostgreSQL and replays chosen slices.

The one import package of the distribution. Its subpackages live at the repository root, where
the layout puts them, and are mapped here (symbolic links the build backend follows):
`rabbit_archive.archive` (what capture and replay share: schema, SQL, AMQP codec and frames),
`rabbit_archive.capture` (the daemon), `rabbit_archive.replay` (the replay tool),
`rabbit_archive.config` (settings) and `rabbit_archive.inbox` (idempotent consumers, for
applications). Importing any of them opens nothing and changes nothing global.
"""
