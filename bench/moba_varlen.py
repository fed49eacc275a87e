"""MoBA packed-documents benchmark (issue 4).

`python bench/moba_varlen.py [--quick | --full] [--out bench/results/moba_varlen.json]`."""

import sys

from sparse_attn.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["moba_varlen", *sys.argv[1:]]))
