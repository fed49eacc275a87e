"""Triton kernels. Importing this package requires triton; callers check `triton_available()` first."""
