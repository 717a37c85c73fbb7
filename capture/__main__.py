"""`python -m capture` is `rabbit-capture`."""

from capture.cli import main

main()
