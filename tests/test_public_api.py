"""The library's public surface: every name in ``receiver.__all__`` exists and says what it is."""

from __future__ import annotations

import receiver


def test_all_names_exist_and_are_documented() -> None:
    for name in receiver.__all__:
        obj = getattr(receiver, name)
        if name != "__version__":
            assert (obj.__doc__ or "").strip(), f"{name} has no docstring"


def test_the_design_documents_names_are_public() -> None:
    for name in ("EbpfEvent", "EbpfEventType", "EbpfConfig", "EbpfCpuProfiler", "EbpfOtlpConverter",
                 "ConversionError", "send"):
        assert name in receiver.__all__
