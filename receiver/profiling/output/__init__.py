"""Writers of a ``CpuProfile``: pprof files and folded stacks / flame graphs."""
