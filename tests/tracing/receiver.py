"""A real OTLP/HTTP traces receiver for the tests: an aiohttp server on a free port that
decodes each ExportTraceServiceRequest with the official opentelemetry-proto package."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)


@dataclass
class Span:
    name: str
    trace_id: str
    span_id: str
    parent: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    resource: dict[str, Any]
    status: int


def _value(v: Any) -> Any:
    return getattr(v, v.WhichOneof("value"))


@dataclass
class Receiver:
    url: str = ""
    spans: list[Span] = field(default_factory=list)
    requests: int = 0
    runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.Response:
        assert request.headers["Content-Type"] == "application/x-protobuf"
        message = ExportTraceServiceRequest.FromString(await request.read())
        self.requests += 1
        for rs in message.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(
                        Span(
                            s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                            s.kind, s.start_time_unix_nano, s.end_time_unix_nano,
                            {a.key: _value(a.value) for a in s.attributes}, resource,
                            s.status.code,
                        )
                    )  # fmt: skip
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/v1/traces", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/v1/traces"
        return self

    async def wait_for(
        self, count: int, name: str | None = None, timeout_s: float = 20
    ) -> list[Span]:
        """The spans once at least `count` (named `name`) have arrived; fails after timeout_s
        (a bound on waiting, not a speed check)."""
        loop = asyncio.get_running_loop()
        until = loop.time() + timeout_s
        while True:
            got = [s for s in self.spans if name is None or s.name == name]
            if len(got) >= count:
                return got
            assert loop.time() < until, f"{len(got)} spans named {name}: {self.spans}"
            await asyncio.sleep(0.02)
