"""XAttention benchmark (issue 5): `python bench/xattention.py [--quick | --full] [--out FILE.json]`."""

import sys

from sparse_attn.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["xattention", *sys.argv[1:]]))
