"""Benchmarks: `python -m sparse_attn.bench {SUITE | all | report} ...` (see __main__ and bench/NOTES.md)."""
