"""The `fullpower` verbs that talk to a running server through its admin listener (reload,
worker, cache, jobs, status, status --fleet): where that listener is, its token, one call."""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from proxy.config import parse_host_port


class AdminError(Exception):
    """The admin listener could not be reached or refused; `body` is its JSON answer, if any."""

    def __init__(self, message: str, body: dict | None = None) -> None:
        super().__init__(message)
        self.body = body or {}


def _admin_address(args) -> str:
    """--admin, else the config's admin_listen (read leniently: `reload` must reach the server even
    when the file now holds errors, so that the server reports them)."""
    if args.admin:
        return args.admin
    try:
        import yaml

        raw = yaml.safe_load(Path(args.config).read_text())
        if isinstance(raw, dict) and isinstance(raw.get("admin_listen"), str):
            return raw["admin_listen"]
    except (OSError, ValueError):
        pass
    from proxy.config import DEFAULT_ADMIN_LISTEN

    return DEFAULT_ADMIN_LISTEN


def _admin_token(args) -> str:
    """--admin-token-file, else the config's admin_token_file, else <data_dir>/admin.token (read
    leniently, like the address)."""
    path = getattr(args, "admin_token_file", None)
    if not path:
        try:
            import yaml

            from proxy.config import default_data_dir

            raw = yaml.safe_load(Path(args.config).read_text())
            raw = raw if isinstance(raw, dict) else {}
            data_dir = Path(raw["data_dir"]) if isinstance(raw.get("data_dir"), str) and raw["data_dir"] else None
            path = raw.get("admin_token_file") or ((data_dir or default_data_dir()) / "admin.token")
        except (OSError, ValueError):
            from proxy.config import default_data_dir

            path = default_data_dir() / "admin.token"
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise AdminError(f"cannot read the admin token ({path}): {exc.strerror or exc}") from None


def _admin(args, path: str, post: bool = False, timeout: float = 1800) -> dict:
    """One call to the admin listener; its JSON answer, or AdminError saying why not."""
    address = _admin_address(args)
    host, port = parse_host_port(address)
    req = urllib.request.Request(f"http://{host}:{port}{path}", data=b"" if post else None,
                                 method="POST" if post else "GET",
                                 headers={"Authorization": f"Bearer {_admin_token(args)}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        try:
            body = json.load(exc)
        except ValueError:
            body = {}
        raise AdminError(body.get("error", {}).get("message") or f"HTTP {exc.code}", body) from None
    except (urllib.error.URLError, OSError) as exc:
        raise AdminError(f"cannot reach the admin listener at {address}: {exc}") from None


def cmd_reload(args) -> int:
    try:
        body = _admin(args, "/admin/reload", post=True)
    except AdminError as exc:
        for line in exc.body.get("problems") or [str(exc)]:
            print(line, file=sys.stderr)
        if exc.body.get("problems"):
            print("reload refused: the server keeps running its previous config", file=sys.stderr)
            return 2
        return 1
    for line in body.get("changes") or ["no worker changes"]:
        print(line)
    return 0


def cmd_worker(args) -> int:
    path = (f"/admin/pools/{args.target}/restart" if args.action == "rolling-restart"
            else f"/admin/workers/{args.target}/{args.action}")
    print(json.dumps(_admin(args, path, post=True)))
    return 0


def cmd_cache(args) -> int:
    body = _admin(args, "/admin/cache/clear", post=True, timeout=60)
    print(f"cleared {body['cleared']} cache entries")
    return 0


def cmd_jobs(args) -> int:
    if args.action == "list":
        query = f"?limit={args.limit}" + (f"&status={args.status}" if args.status else "")
        data = _admin(args, "/admin/jobs" + query)
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            for job in data["data"]:
                print(f"{job['id']}  {job['status']:<10} attempts={job['attempts']}  {job['error'] or ''}")
        return 0
    if not args.id:
        print("a job id is needed", file=sys.stderr)
        return 2
    if args.action == "show":
        print(json.dumps(_admin(args, f"/admin/jobs/{args.id}"), indent=2))
        return 0
    body = _admin(args, f"/admin/jobs/{args.id}/{args.action}", post=True, timeout=60)
    print(f"{body['id']}  {body['status']}")
    return 0


def cmd_fleet(args) -> int:
    data = _admin(args, "/admin/fleet", timeout=5)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    now = time.time()
    print(f"{'HOST':<24} {'ADDRESS':<22} {'READY':<12} {'INFLIGHT':>8} {'QUEUED':>7} {'UP':>8}  SEEN")
    for h in data["hosts"]:
        ready = ", ".join(f"{name} {p['ready']}/{p['workers']}" for name, p in h.get("pools", {}).items())
        mark = " (this host)" if h["id"] == data["self"] else ""
        print(f"{h['id']:<24} {h['address']:<22} {ready:<12} {h['load']['inflight']:>8} {h['load']['queued']:>7} "
              f"{now - h['started_at']:>7.0f}s  {now - h['published_at']:.0f}s ago{mark}")
    return 0


def cmd_status(args) -> int:
    if args.fleet:
        return cmd_fleet(args)
    data = _admin(args, "/admin/pool", timeout=5)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    cols = ("id", "pid", "device", "model", "state", "age", "inflight", "weights", "restarts", "last_error")
    for w in data["workers"]:
        w["weights"] = f"{w['weight_bytes'] / 2**20:.0f} MiB" if w.get("weight_bytes") else None
        # age of the process; "adopted" when it was running before this proxy started (model kept)
        w["age"] = (f"{w['age_s']:.0f}s" + (" adopted" if w.get("adopted") else "")) if w.get("age_s") else None
    rows = [[("" if w.get(c) is None else str(w.get(c))) for c in cols] for w in data["workers"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    print("  ".join(c.upper().ljust(widths[i]) for i, c in enumerate(cols)).rstrip())
    for r in rows:
        print("  ".join(v.ljust(widths[i]) for i, v in enumerate(r)).rstrip())
    return 0
