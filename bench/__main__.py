"""python -m bench: the benchmark run by scripts/bench."""

from bench.run import main

main()
