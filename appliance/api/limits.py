"""Limits on the HTTP connections of api/http_server.py ([server] in the config).

Why: a device on a factory network meets clients that open connections and never use them,
and clients that send a request a byte at a time (slowloris). Without limits each one holds a
file descriptor and a little memory forever; enough of them and `accept()` fails with EMFILE,
so even the health check goes unanswered. The limits are explicit, configurable and cheap: the
timers are checked by one sweep a second, not per request.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass

log = logging.getLogger("appliance.http")

#: File descriptors kept free for everything else (model files, worker pipes, SQLite, MQTT,
#: gRPC) when `max_connections` is capped by RLIMIT_NOFILE.
FD_RESERVE = 64
DEFAULT_MAX_CONNECTIONS = 1024


@dataclass(frozen=True)
class ConnectionLimits:
    #: Open client connections at most; at the limit a new one closes the longest-idle one,
    #: or, with none idle, is answered 503 and closed.
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    #: Seconds from a request's first byte until its whole head (request line, headers) is in.
    header_timeout_s: float = 10.0
    #: Seconds from the end of a head until the whole body is in.
    body_timeout_s: float = 60.0
    #: Seconds a connection may sit idle between requests.
    keepalive_timeout_s: float = 75.0


def connection_cap(limits: ConnectionLimits) -> int:
    """`max_connections`, lowered so that connections alone cannot exhaust the process's file
    descriptors (RLIMIT_NOFILE): the limit then acts before `accept()` fails with EMFILE."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return limits.max_connections
    reserve = FD_RESERVE if soft >= 2 * FD_RESERVE else soft // 2
    cap = max(1, soft - reserve)
    if cap < limits.max_connections:
        # Said louder when the value was chosen rather than left at its default.
        level = (
            logging.INFO if limits.max_connections == DEFAULT_MAX_CONNECTIONS else logging.WARNING
        )
        log.log(
            level,
            "server.max_connections = %d is above what RLIMIT_NOFILE (%d) allows: %d connections "
            "at most (raise LimitNOFILE= in the unit, or lower max_connections)",
            limits.max_connections,
            soft,
            cap,
        )
        return cap
    return limits.max_connections
