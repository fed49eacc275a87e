"""Engine benchmark (issue 3): `python bench/engine.py [--quick | --full] [--out bench/results/engine.json]`."""

import sys

from sparse_attn.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["engine", *sys.argv[1:]]))
