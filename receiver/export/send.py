"""Sending ready-made OTLP requests from library code, e.g. the request
``EbpfOtlpConverter.convert_profile_to_otlp`` returns: ``send(request)`` or, inside an event
loop, ``await send_async(request)``. The same exporter the agent uses (OTLP/gRPC or OTLP/HTTP,
``OTEL_EXPORTER_OTLP_*`` honoured, retries, size limits), started and shut down around the send.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from ..config import EbpfConfig, ExporterConfig
from ..errors import ExportError
from ..model import Signal
from ..telemetry import SelfTelemetry
from .exporter import OtlpExporter
from .signals import SPECS, count_items

__all__ = ["send", "send_async"]


def _signal_of(request: Any) -> Signal:
    for signal, spec in SPECS.items():
        if isinstance(request, spec.request):
            return signal
    raise TypeError(f"not an OTLP Export*ServiceRequest: {type(request).__name__}")


async def send_async(requests: Any | Iterable[Any], config: EbpfConfig | ExporterConfig | None = None) -> int:
    """Sends the request(s) and returns how many items the Collector accepted; raises
    ``ExportError`` when some were not (dropped after retries, rejected, or too large)."""
    if config is None:
        config = EbpfConfig.default()
    exporter_config = config.exporter if isinstance(config, EbpfConfig) else config
    batch = [requests] if hasattr(requests, "SerializeToString") else list(requests)
    telemetry = SelfTelemetry()
    exporter = OtlpExporter(exporter_config, telemetry)
    total = 0
    await exporter.start()
    try:
        for request in batch:
            signal = _signal_of(request)
            total += count_items(signal, request)
            exporter.submit_request(signal, request)
    finally:
        await exporter.shutdown()
    totals = telemetry.totals()
    sent, dropped = int(sum(totals["sent"].values())), int(sum(totals["dropped"].values()))
    if dropped or sent < total:
        raise ExportError(f"{sent} of {total} items accepted; {dropped} dropped "
                          f"({', '.join(f'{k} {int(v)}' for k, v in totals['dropped'].items() if v)})")
    return sent


def send(requests: Any | Iterable[Any], config: EbpfConfig | ExporterConfig | None = None) -> int:
    """``send_async`` for code without an event loop."""
    return asyncio.run(send_async(requests, config))
