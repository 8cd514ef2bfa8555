"""sd_notify: READY, STATUS, WATCHDOG and STOPPING reach $NOTIFY_SOCKET; the unit file says what
the README promises."""

import configparser
import socket
import subprocess
import time

from tests.conftest import FULLPOWER, ROOT, Server, fake_config


def test_notify_protocol(tmp_path):
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(0.2)
    server = Server(fake_config(), tmp_path)
    import os
    env = {**os.environ, "NOTIFY_SOCKET": address, "WATCHDOG_USEC": "400000"}
    log = open(server.log_path, "wb")
    server._log = log
    server.proc = subprocess.Popen(FULLPOWER + ["serve", "--config", str(server.config_path)], cwd=ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    server.wait_ready()
    messages = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and sum("WATCHDOG=1" in m for m in messages) < 3:
        try:
            messages.append(sock.recv(4096).decode())
        except socket.timeout:
            pass
    server.stop()
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except socket.timeout:
            break
    text = "\n".join(messages)
    assert "READY=1" in text and "STOPPING=1" in text
    assert sum("WATCHDOG=1" in m for m in messages) >= 3  # every WatchdogSec/2
    assert "STATUS=2/2 workers ready" in text


def test_unit_file():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string((ROOT / "systemd/fullpower.service").read_text().replace("DeviceAllow=", "DeviceAllow_=", 1))
    svc = unit["Service"]
    assert svc["Type"] == "notify" and svc["WatchdogSec"] and svc["TimeoutStopSec"]
    # the workers outlive a crashed proxy (adoption: tests/test_adoption.py); the proxy stops them on SIGTERM
    assert svc["KillMode"] == "process" and svc["OOMPolicy"] == "continue" and svc["Restart"] == "always"
    assert svc["NoNewPrivileges"] == "yes" and svc["ProtectSystem"] == "strict" and svc["DevicePolicy"] == "closed"
    text = (ROOT / "systemd/fullpower.service").read_text()
    assert "\nPrivateDevices" not in text and "\nMemoryDenyWriteExecute" not in text
    assert "DeviceAllow=/dev/nvidiactl" in text


def test_socket_unit_passes_the_public_listener():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read_string((ROOT / "systemd/fullpower.socket").read_text())
    sock = unit["Socket"]
    assert sock["FileDescriptorName"] == "public"  # the name proxy.systemd.inherited_sockets maps
    assert sock["ListenStream"] == "127.0.0.1:8080"  # the shipped config's listen
    assert unit["Unit"]["PartOf"] == "fullpower.service"
    import shutil

    if shutil.which("systemd-analyze"):  # systemd's own parser, where installed
        verify = subprocess.run(["systemd-analyze", "verify", str(ROOT / "systemd/fullpower.socket")],
                                capture_output=True, text=True)
        assert verify.returncode == 0, verify.stderr
