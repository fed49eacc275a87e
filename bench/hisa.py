"""HISA benchmark: `python bench/hisa.py [--quick | --full] [--out FILE.json]`."""

import sys

from sparse_attn.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["hisa", *sys.argv[1:]]))
