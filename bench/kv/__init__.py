"""Benchmarks of examples/kv.py, its asyncio twin and redis-server: python -m bench.kv.run."""
