"""S2O benchmark: `python bench/s2o.py [--quick | --full] [--out FILE.json]`."""

import sys

from sparse_attn.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["s2o", *sys.argv[1:]]))
