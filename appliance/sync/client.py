"""The hub's device API over HTTP: assignments (polled with ETags) and telemetry upload."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from .. import tracing
from ..errors import ModelError
from ..registry import check_name
from .tuf_client import Refused, Unreachable


@dataclass(frozen=True)
class Assignment:
    """One model version the hub wants this device to run; the file itself is proven by TUF."""

    name: str
    version: str
    target: str
    rollout: str

    @classmethod
    def from_json(cls, obj: Any) -> Assignment:
        if not isinstance(obj, dict):
            raise Refused(f"assignment {obj!r} is not an object")
        try:
            name = check_name(str(obj["name"]), "model name")
            version = check_name(str(obj["version"]), "version")
            target = str(obj["target"])
        except KeyError as exc:
            raise Refused(f"assignment {obj!r} lacks {exc}") from None
        except ModelError as exc:
            raise Refused(f"assignment refused: {exc.message}") from None
        parts = target.split("/")
        if len(parts) != 3 or parts[:2] != [name, version] or not parts[2] or ".." in parts[2]:
            raise Refused(f"assignment target {target!r} is not {name}/{version}/<file>")
        return cls(name, version, target, str(obj.get("rollout", "")))


class HubClient:
    """One aiohttp session to the hub, with the device token on every request."""

    def __init__(self, base_url: str, token: str, device_id: str, timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}", "User-Agent": "appliance-sync"}
        if device_id:
            self._headers["X-Device-Id"] = device_id
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._etag: str | None = None
        self._assignments: list[Assignment] = []

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers, timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def assignments(self) -> tuple[list[Assignment], bool]:
        """The current assignments and whether they changed since the last call (a 304 costs
        the hub one ETag comparison and sends no body)."""
        headers = {"If-None-Match": self._etag} if self._etag else {}
        tracing.inject(headers)  # the hub's span joins the poll's trace
        url = f"{self.base_url}/api/v1/device/assignments"
        try:
            async with self._client().get(url, headers=headers) as r:
                if r.status == 304:
                    return self._assignments, False
                body = await r.read()
                if r.status != 200:
                    raise Unreachable(f"GET assignments: HTTP {r.status}: {_error(body)}")
                etag = r.headers.get("ETag")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise Unreachable(f"hub unreachable: {type(exc).__name__}: {exc}") from None
        try:
            obj = orjson.loads(body)
            models = obj["models"]
            if not isinstance(models, list):
                raise TypeError("models is not a list")
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise Refused(f"assignments are not valid JSON: {exc}") from None
        self._assignments = [Assignment.from_json(m) for m in models]
        self._etag = etag
        return self._assignments, True

    async def upload(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        """POST a batch of telemetry events; the hub answers {"stored", "duplicates", "max_seq"}."""
        url = f"{self.base_url}/api/v1/device/telemetry"
        try:
            async with self._client().post(
                url,
                data=orjson.dumps({"events": events}),
                headers=tracing.injected({"Content-Type": "application/json"}),
            ) as r:
                body = await r.read()
                if r.status != 200:
                    raise Unreachable(f"POST telemetry: HTTP {r.status}: {_error(body)}")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise Unreachable(f"hub unreachable: {type(exc).__name__}: {exc}") from None
        try:
            result = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise Unreachable(f"telemetry answer is not JSON: {exc}") from None
        if not isinstance(result, dict):
            raise Unreachable("telemetry answer is not an object")
        return result


def _error(body: bytes) -> str:
    try:
        obj = orjson.loads(body)
        if isinstance(obj, dict) and "error" in obj:
            return str(obj["error"])
    except orjson.JSONDecodeError:
        pass
    return body[:200].decode("utf-8", "replace")
