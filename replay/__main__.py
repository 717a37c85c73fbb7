"""`python -m rabbit_archive.replay` is `rabbit-replay`."""

from rabbit_archive.replay.cli import main

main()
