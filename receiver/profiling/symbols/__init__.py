"""Naming sampled addresses: ELF symbol tables and build ids, the kernel's kallsyms, per-process
mappings, and C++/Rust demangling."""
