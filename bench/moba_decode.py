"""Routed MoBA decode benchmark (issue 4): a decode step from followed block means, pooling, dense.

`python bench/moba_decode.py [--quick | --full] [--out bench/results/moba_decode.json]`."""

import sys

from sparse_attn.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["moba_decode", *sys.argv[1:]]))
