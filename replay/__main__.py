"""`python -m replay` is `rabbit-replay`."""

from replay.cli import app

app()
