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
