"""`python -m replay` is `rabbit-replay`."""

from replay.cli import main

main()
