"""sd_notify over $NOTIFY_SOCKET (a no-op outside systemd), and listening sockets passed by
socket activation (LISTEN_FDS)."""

from __future__ import annotations

import os
import socket
from typing import Callable


LISTEN_FDS_START = 3  # sd_listen_fds(3): passed sockets start at this descriptor


def inherited_sockets() -> dict[str, socket.socket]:
    """Listening sockets passed by systemd socket activation (or any harness that follows
    sd_listen_fds(3)), by name: LISTEN_FDNAMES (FileDescriptorName= in the .socket unit), else
    "public" for the first and "admin" for the second. Empty when none were passed to this
    process. The variables are removed so that nothing started from here takes them as its own."""
    pid, count = os.environ.get("LISTEN_PID", ""), os.environ.get("LISTEN_FDS", "")
    names = os.environ.get("LISTEN_FDNAMES", "")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    if not (pid.isdigit() and int(pid) == os.getpid() and count.isdigit()):
        return {}
    labels = names.split(":") if names else []
    defaults = ["public", "admin"]
    found = {}
    for i in range(int(count)):
        fd = LISTEN_FDS_START + i
        os.set_inheritable(fd, False)  # not into worker processes
        name = labels[i] if i < len(labels) and labels[i] and labels[i] != "unknown" else (
            defaults[i] if i < len(defaults) else f"fd{fd}")
        found[name] = socket.socket(fileno=fd)
    return found


def notify(state: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
        return True
    except OSError:
        return False


async def watchdog_loop(status: "Callable[[], str]") -> None:
    """WATCHDOG=1 from the event loop itself (a blocked loop stops the pings, and systemd restarts
    the service), every half of WatchdogSec, with a STATUS line; STATUS only outside a watchdog."""
    import asyncio

    usec = os.environ.get("WATCHDOG_USEC")
    interval = int(usec) / 2e6 if usec and usec.isdigit() else 10.0
    while True:
        parts = [f"STATUS={status()}"]
        if usec:
            parts.append("WATCHDOG=1")
        notify("\n".join(parts))
        await asyncio.sleep(interval)
