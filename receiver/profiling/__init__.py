"""CPU profiling: the profile model, symbolization, and writers (pprof, folded, flame graph)."""
