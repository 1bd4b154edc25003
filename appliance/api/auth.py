"""Bearer tokens with scopes, checked the same way by every front (aiohttp routes, the fast path,
WebSocket upgrades, gRPC metadata), and a limit on failed attempts per client address.

Why hashes: the config may hold only a token's SHA-256 (`token_sha256`), so a leaked config file
does not leak the token; the given token is hashed once and compared with every configured
digest by `hmac.compare_digest`, all of them every time, so neither the timing nor an early exit
tells which token (or how much of one) matched. Tokens are never logged: only their names are.

Scopes: `infer` (inference, generation, OpenAI routes, metadata, WebSocket and gRPC infer) and
`admin` (repository load/unload/index, activation and rollback, trace settings); admin implies
infer. A route declares its scope where it is declared (api/routes.py), so a new route cannot
forget it.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..config import Config, load_tokens_file
from ..errors import ConfigError, Forbidden, TooManyAttempts, Unauthorized
from .routes import Scope

#: What each scope a token holds lets it call (admin implies infer).
_GRANTS: dict[str, frozenset[str]] = {
    "infer": frozenset({"infer"}),
    "admin": frozenset({"infer", "admin"}),
}
#: The name the single `server.auth_token` (or `--token-file`) goes by: an admin token.
LEGACY_NAME = "auth_token"


@dataclass(frozen=True)
class Token:
    """A configured token: its name (for logs and errors), SHA-256 digest and granted scopes."""

    name: str
    digest: bytes
    grants: frozenset[str]

    @classmethod
    def of(cls, name: str, secret: str, scopes: Iterable[str]) -> Token:
        return cls(name, _digest(secret), _grants(scopes))


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def _grants(scopes: Iterable[str]) -> frozenset[str]:
    return frozenset().union(*(_GRANTS[s] for s in scopes))


class FailureLimit:
    """At most `per_window` failed attempts per client address in a sliding window; then the
    address is refused (429) until its oldest failure leaves the window. Memory is bounded:
    at most `max_clients` addresses are remembered, the least recently failing forgotten first.
    Monotonic time: a clock jump neither frees nor locks a client."""

    def __init__(
        self,
        per_window: int,
        window_s: float = 60.0,
        max_clients: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.per_window = per_window
        self.window_s = window_s
        self.max_clients = max_clients
        self._clock = clock
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def retry_after(self, client: str) -> float | None:
        """Seconds until `client` may try again, or None if it may now."""
        times = self._failures.get(client)
        if times is None or len(times) < self.per_window:
            return None
        left = times[0] + self.window_s - self._clock()
        if left <= 0:
            return None
        return left

    def failed(self, client: str) -> None:
        times = self._failures.get(client)
        if times is None:
            times = self._failures[client] = deque(maxlen=self.per_window)
            while len(self._failures) > self.max_clients:
                self._failures.popitem(last=False)
        else:
            self._failures.move_to_end(client)
        times.append(self._clock())

    def __len__(self) -> int:
        return len(self._failures)


class Auth:
    """The tokens of one server and its failed-attempt limit; no tokens: auth is off."""

    def __init__(self, tokens: Sequence[Token], failures_per_minute: int = 10) -> None:
        self.tokens = tuple(tokens)
        self.limit = FailureLimit(failures_per_minute)

    @property
    def enabled(self) -> bool:
        return bool(self.tokens)

    def check(self, authorization: str | None, scope: Scope, client: str | None) -> str | None:
        """The name of the token `authorization` (`Bearer <token>`) carries, if it grants
        `scope`; raises 401 (no or unknown token), 403 (a token without the scope) or 429
        (this client failed too often). None for public routes or when auth is off."""
        if scope == "public" or not self.tokens:
            return None
        key = client or "?"
        wait = self.limit.retry_after(key)
        if wait is not None:
            raise TooManyAttempts(
                "too many failed authentication attempts from this address: "
                f"retry in {max(1, round(wait))} s",
                wait,
            )
        scheme, _, given = (authorization or "").partition(" ")
        digest = _digest(given.strip())
        found: Token | None = None
        for token in self.tokens:  # every one, every time: no early exit
            if hmac.compare_digest(digest, token.digest) and found is None:
                found = token
        if found is None or scheme.lower() != "bearer":
            self.limit.failed(key)
            raise Unauthorized("missing or wrong bearer token")
        if scope not in found.grants:
            raise Forbidden(f"token {found.name!r} lacks the {scope!r} scope this route needs")
        return found.name


def client_address(peer: str | None) -> str | None:
    """The address of a gRPC peer (`ipv4:127.0.0.1:5000`, `ipv6:[::1]:5000`) without its port:
    failed attempts are counted per address, not per connection."""
    if not peer:
        return None
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("["):
        return rest[1 : rest.find("]")] if "]" in rest else rest
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    return peer


def from_config(config: Config) -> Auth:
    """The server's tokens: `[[server.tokens]]`, those of `tokens_file`, and the single
    `auth_token` (an admin token)."""
    server = config.server
    tokens = []
    legacy = config.token()
    if legacy:
        tokens.append(Token.of(LEGACY_NAME, legacy, ["admin"]))
    entries = list(server.tokens)
    if server.tokens_file:
        entries += load_tokens_file(server.tokens_file)
    names = [e.name for e in entries] + ([LEGACY_NAME] if legacy else [])
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"server.tokens: the name {name!r} is used twice")
    for entry in entries:
        where = f"server.tokens[{entry.name!r}]"
        if entry.token_sha256:
            digest = bytes.fromhex(entry.token_sha256)
            tokens.append(Token(entry.name, digest, _grants(entry.scopes)))
            continue
        secret = _read_secret(entry.token_file, f"{where}.token_file")
        tokens.append(Token.of(entry.name, secret, entry.scopes))
    return Auth(tokens, server.auth_failures_per_minute)


def _read_secret(path: str, where: str) -> str:
    try:
        secret = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"{where} = {path!r}: cannot read: {exc.strerror}") from None
    if not secret:
        raise ConfigError(f"{where} = {path!r}: the file is empty")
    return secret
