"""Free loopback ports for the private servers (tests, benchmarks, ``mxguard demo``).

``free_port()`` asks the kernel for an unused port (bind to port 0) and
remembers what it handed out in this process, so two calls never return the
same port even if the first caller has not bound it yet. There is still a
small window in which another process could take the port; servers should
bind soon after asking.
"""

from __future__ import annotations

import socket
import threading

_lock = threading.Lock()
_handed_out: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """An unused TCP port on ``host`` (loopback by default)."""
    with _lock:
        for _ in range(50):
            with socket.socket() as s:
                s.bind((host, 0))
                port = int(s.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError(f"no free port on {host}")


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct unused TCP ports on ``host``."""
    return [free_port(host) for _ in range(count)]


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when nothing listens on ``host:port`` (TCP) right now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True
