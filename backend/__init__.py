"""fullpower model workers: the engines and the worker process (never imports aiohttp or proxy)."""
