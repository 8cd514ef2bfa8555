"""sd_notify over $NOTIFY_SOCKET (a no-op outside systemd)."""

from __future__ import annotations

import os
import socket
from typing import Callable


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
