"""Unwind tables for the in-kernel stack walker: built from a file's call-frame information
(``cfi_table``) and kept loaded in the kernel's maps for the processes being sampled (``table_store``)."""
