"""The core: plain Python that decides. No aiohttp, asyncio, redis, prometheus_client, yaml, sockets or files (tests/test_layout.py)."""
