"""Benchmarks (``make bench [BENCH=NAME]``): each measures side by side in one run and ends with
``bench: NAME FIGURE=VALUE UNIT`` lines."""
