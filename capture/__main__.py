"""`python -m rabbit_archive.capture` is `rabbit-capture`."""

from rabbit_archive.capture.cli import main

main()
