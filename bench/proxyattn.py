"""ProxyAttn benchmark: `python bench/proxyattn.py [--quick | --full] [--out FILE.json]`."""

import sys

from sparse_attn.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["proxyattn", *sys.argv[1:]]))
