"""The profiles signal (profiles v1development) reaches the real Collector and decodes."""

from __future__ import annotations

import asyncio
import time

from opentelemetry.proto.collector.profiles.v1development.profiles_service_pb2 import (
    ExportProfilesServiceRequest,
)
from opentelemetry.proto.profiles.v1development import profiles_pb2 as pb

from receiver.config import ExporterConfig
from receiver.convert.attributes import to_key_values
from receiver.export import OtlpGrpcExporter
from receiver.model import Signal
from receiver.telemetry import SelfTelemetry

from ..harness import Collector, wait_until


def _request() -> ExportProfilesServiceRequest:
    now = time.time_ns()
    d = pb.ProfilesDictionary(string_table=["", "samples", "count", "cpu", "nanoseconds", "burn_a"])
    d.mapping_table.add()                       # index 0: the null mapping
    d.function_table.add()                      # index 0: null
    d.function_table.add(name_strindex=5, system_name_strindex=5)
    d.location_table.add()                      # index 0: null
    d.location_table.add(address=0x401000).lines.add(function_index=1)
    d.stack_table.add()                         # index 0: the empty stack
    d.stack_table.add(location_indices=[1])
    req = ExportProfilesServiceRequest(dictionary=d)
    rp = req.resource_profiles.add()
    rp.resource.attributes.extend(to_key_values({"service.name": "test", "process.pid": 42}))
    prof = rp.scope_profiles.add().profiles.add(
        sample_type=pb.ValueType(type_strindex=1, unit_strindex=2),
        period_type=pb.ValueType(type_strindex=3, unit_strindex=4), period=50_000_000,
        time_unix_nano=now, duration_nano=1_000_000_000, profile_id=bytes(range(16)))
    prof.samples.add(stack_index=1, values=[7], timestamps_unix_nano=[now])
    return req


def test_profiles_arrive(collector: Collector) -> None:
    telemetry = SelfTelemetry()

    async def main() -> None:
        exporter = OtlpGrpcExporter(ExporterConfig(endpoint=collector.endpoint, batch_timeout=0.05), telemetry)
        await exporter.start()
        assert exporter.submit(Signal.PROFILES, None, _request())
        await exporter.flush()
        await exporter.shutdown()

    asyncio.run(main())
    assert telemetry.registry.get_sample_value("ebpf_receiver_exporter_sent_items_total",
                                               {"signal": "profiles"}) == 1
    reqs = wait_until(lambda: collector.requests("profiles"), 10, what="profiles in the file output")
    prof = reqs[0]["resourceProfiles"][0]["scopeProfiles"][0]["profiles"][0]
    strings = reqs[0]["dictionary"]["stringTable"]
    assert prof["samples"][0]["values"] == ["7"] or prof["samples"][0]["values"] == [7]
    assert "burn_a" in strings
