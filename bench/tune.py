"""Tile sweep of the attention kernels: `python bench/tune.py [--quick | --full] [--out bench/results/tune.json]`."""

import sys

from sparse_attn.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
