import subprocess
import sys


def test_import_proxy_does_not_import_torch():
    code = ("import sys, proxy, proxy.app, proxy.cli, proxy.http.openai, proxy.fleet.supervisor; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_backend_does_not_import_aiohttp_or_proxy():
    code = ("import sys, backend.worker, backend.fake, backend.scheduler, backend.protocol; "
            "bad = [m for m in ('aiohttp', 'proxy') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


# The import rules of docs/architecture.md: each layer may import only the layers below it.
LAYER_RULES = {
    # package: modules it must never import (prefix match)
    "proxy/serving": ("aiohttp", "proxy.http", "proxy.jobs", "proxy.app", "proxy.cli", "proxy.collectors"),
    "proxy/shared": ("aiohttp", "proxy.serving", "proxy.fleet", "proxy.http", "proxy.jobs", "proxy.app", "proxy.cli",
                     "proxy.collectors"),
    "proxy/fleet": ("aiohttp", "proxy.serving", "proxy.http", "proxy.jobs", "proxy.app", "proxy.cli",
                    "proxy.collectors"),
    "proxy/jobs": ("aiohttp.web", "proxy.http", "proxy.app", "proxy.cli", "proxy.collectors"),
    "proxy/http": ("proxy.app", "proxy.cli", "proxy.collectors"),
    "proxy/config.py": ("aiohttp", "proxy.serving", "proxy.fleet", "proxy.jobs", "proxy.http", "proxy.metrics"),
    "proxy/errors.py": ("aiohttp", "proxy."),
    "proxy/metrics.py": ("aiohttp", "proxy."),
}


def _imports(path):
    import ast

    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_layers_import_only_downwards():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    broken = []
    for where, forbidden in LAYER_RULES.items():
        target = root / where
        files = [target] if target.suffix == ".py" else sorted(target.rglob("*.py"))
        assert files, where
        for path in files:
            for name in _imports(path):
                if any(name == f.rstrip(".") or name.startswith(f if f.endswith(".") else f + ".") for f in forbidden):
                    broken.append(f"{path.relative_to(root)} imports {name}")
    assert not broken, broken
