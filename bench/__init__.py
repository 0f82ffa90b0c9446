"""Benchmark suite for threadserve: `python -m bench` (see bench/README.md).

Kept free of imports on purpose: the gevent peer runs as `python -m
bench.peers.gevent_stream` and must monkey-patch before socket or threading
are imported by anything else.
"""
