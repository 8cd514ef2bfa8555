"""`fullpower` command line: serve, check-config, model prepare|verify, status, backup, restore, and
the admin verbs."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from proxy.cli_admin import AdminError, cmd_cache, cmd_jobs, cmd_reload, cmd_status, cmd_worker
from proxy.config import ConfigError, load_config, parse_host_port

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "fullpower.yaml"


def _load_or_exit(path: str):
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.problems:
            print(f"{path}: {line}", file=sys.stderr)
        raise SystemExit(2)


def cmd_check_config(args) -> int:
    cfg = _load_or_exit(args.path)
    from proxy.http.admin_guard import exposure_warning  # noqa: PLC0415 - aiohttp only when needed

    warning = exposure_warning(cfg.admin_listen)
    if warning:
        print(f"{args.path}: warning: {warning}", file=sys.stderr)
    print(f"{args.path}: ok")
    return 0


def cmd_serve(args) -> int:
    cfg = _load_or_exit(args.config)
    if args.listen:
        try:
            parse_host_port(args.listen)
        except ValueError as exc:
            print(f"--listen: {exc}", file=sys.stderr)
            return 2
    logging.basicConfig(level=cfg.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import asyncio

    from proxy.app import serve

    try:
        import uvloop
    except ImportError:
        return asyncio.run(serve(cfg, args.config, listen_override=args.listen))
    return uvloop.run(serve(cfg, args.config, listen_override=args.listen))


def cmd_model(args) -> int:
    # The conversion needs torch and transformers: run it in a fresh interpreter so that the proxy
    # process never imports them.
    argv = [sys.executable, "-m", "backend.model_prep", args.model_cmd]
    if args.model_cmd == "prepare":
        out = args.out
        if out is None:
            from proxy.config import EMBEDDED_MODEL_DIRNAME, default_data_dir

            data_dir = Path(args.data_dir) if args.data_dir else None
            if args.config:
                data_dir = _load_or_exit(args.config).resolved_data_dir()
            out = (data_dir or default_data_dir()) / "models" / EMBEDDED_MODEL_DIRNAME
        argv += ["--out", str(out)]
    else:
        argv.append(str(args.dir))
    os.execv(sys.executable, argv)


def cmd_backup(args) -> int:
    from proxy.backup import BackupError, backup

    cfg = _load_or_exit(args.config)
    try:
        manifest = backup(cfg, Path(args.config), Path(args.dest), with_models=args.with_models)
    except (BackupError, OSError) as exc:
        print(f"backup failed: {exc}", file=sys.stderr)
        return 2
    print(f"{args.dest}: {len(manifest['files'])} files, jobs by state {manifest['jobs']}"
          + (" (model files included)" if args.with_models else ""))
    return 0


def cmd_restore(args) -> int:
    from proxy.backup import BackupError, restore

    cfg = _load_or_exit(args.config)
    if args.data_dir:
        import msgspec

        cfg = msgspec.structs.replace(cfg, data_dir=args.data_dir)
    import socket

    host, port = parse_host_port(cfg.admin_listen)
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        pass  # nothing listens on the admin address: the server is stopped, as it must be
    else:
        print(f"restore: a server is running (its admin listener {cfg.admin_listen} answers); stop it first",
              file=sys.stderr)
        return 2
    try:
        done = restore(Path(args.src), cfg)
    except BackupError as exc:
        print(f"restore failed after changes: {exc}" if exc.changed else f"restore refused, nothing changed: {exc}",
              file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"restore failed: {exc}", file=sys.stderr)
        return 2
    for line in done:
        print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fullpower", description="LLM serving appliance")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("loadtest", help="offer a workload to a running server (see python -m loadtest --help)",
                       add_help=False)
    p.set_defaults(func=None)

    p = sub.add_parser("serve", help="run the proxy and its workers in the foreground")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--listen", help="HOST:PORT, overrides the config's listen")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("check-config", help="validate a config file (exit 2 with one line per problem)")
    p.add_argument("path")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("model", help="prepare or verify model directories")
    msub = p.add_subparsers(dest="model_cmd", required=True)
    mp = msub.add_parser("prepare", help="convert the embedded SmolLM2 GGUF into a safetensors directory")
    mp.add_argument("--out", type=Path)
    mp.add_argument("--data-dir")
    mp.add_argument("--config", help="take data_dir from this config")
    mv = msub.add_parser("verify", help="check a model directory against its manifest")
    mv.add_argument("dir", type=Path)
    p.set_defaults(func=cmd_model)

    p = sub.add_parser("backup", help="a consistent snapshot (job store, config, token, model manifests) while serving")
    p.add_argument("dest", help="a new (or empty) directory")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--with-models", action="store_true", help="copy the model files too")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("restore", help="verify a backup's checksums, then restore it (the server must be stopped)")
    p.add_argument("src")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--data-dir", help="restore into this data directory instead of the config's")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("status", help="show the worker pool (from the admin listener)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--fleet", action="store_true", help="every appliance sharing state with this one (Redis)")
    p.add_argument("--admin", help="admin HOST:PORT (default: from the config)")
    p.add_argument("--admin-token-file", help="the admin token (default: the config's admin_token_file)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("reload", help="re-read and apply the config file of the running server "
                                      "(exit 2 and no change if it is invalid); SIGHUP does the same")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--admin", help="admin HOST:PORT (default: from the config)")
    p.add_argument("--admin-token-file", help="the admin token (default: the config's admin_token_file)")
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("cache", help="clear the answer cache (memory and disk) of the running server")
    p.add_argument("action", choices=["clear"])
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--admin", help="admin HOST:PORT (default: from the config)")
    p.add_argument("--admin-token-file", help="the admin token (default: the config's admin_token_file)")
    p.set_defaults(func=cmd_cache)

    p = sub.add_parser("jobs", help="list, show, cancel or retry async jobs")
    p.add_argument("action", choices=["list", "show", "cancel", "retry"])
    p.add_argument("id", nargs="?")
    p.add_argument("--status")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--admin", help="admin HOST:PORT (default: from the config)")
    p.add_argument("--admin-token-file", help="the admin token (default: the config's admin_token_file)")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("worker", help="drain, undrain, restart or kill one worker; rolling-restart a pool")
    p.add_argument("action", choices=["drain", "undrain", "restart", "kill", "rolling-restart"])
    p.add_argument("target", help="worker id (e.g. main-0), or the pool name for rolling-restart")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--admin", help="admin HOST:PORT (default: from the config)")
    p.add_argument("--admin-token-file", help="the admin token (default: the config's admin_token_file)")
    p.set_defaults(func=cmd_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["loadtest"]:
        from loadtest.cli import main as loadtest_main

        return loadtest_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except AdminError as exc:
        print(exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
