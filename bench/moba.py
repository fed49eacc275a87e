"""MoBA benchmark (issue 4): `python bench/moba.py [--quick | --full] [--out bench/results/moba.json]`."""

import sys

from sparse_attn.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["moba", *sys.argv[1:]]))
