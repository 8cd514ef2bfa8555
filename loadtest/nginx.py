"""A private nginx for tests and benchmarks: a prefix directory with its own main config that
includes one site file, so Debian's nginx runs as an unprivileged foreground process on loopback."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def nginx_prefix(root: Path, site_name: str, site: str, worker_connections: int = 1024,
                 access_log: bool = True) -> Path:
    """Write `site` (an http-context file) and a main config including it under `root`; returns
    the main config, checked with `nginx -t`."""
    for d in ("logs", "tmp"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / site_name).write_text(site)
    conf = root / "nginx.conf"
    user = "user root;" if os.geteuid() == 0 else ""
    log = f"access_log {root}/logs/access.log;" if access_log else "access_log off;"
    conf.write_text(f"""
{user}
worker_processes 1;
error_log {root}/logs/error.log warn;
pid {root}/nginx.pid;
events {{ worker_connections {worker_connections}; }}
http {{
    {log}
    client_body_temp_path {root}/tmp/body;
    proxy_temp_path {root}/tmp/proxy;
    fastcgi_temp_path {root}/tmp/fastcgi;
    uwsgi_temp_path {root}/tmp/uwsgi;
    scgi_temp_path {root}/tmp/scgi;
    include {root}/{site_name};
}}
""")
    subprocess.run([nginx_binary(), "-t", "-p", str(root), "-c", str(conf)], check=True, capture_output=True)
    return conf
