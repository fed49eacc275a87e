"""Decode benchmark: `python bench/decode.py [--quick | --full] [--out bench/results/decode.json]`."""

import sys

from sparse_attn.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["decode", *sys.argv[1:]]))
