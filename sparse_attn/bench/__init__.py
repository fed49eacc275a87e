"""Benchmarks: `python -m sparse_attn.bench SUITE [--quick | --full] [--out PATH]`."""
