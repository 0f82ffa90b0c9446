"""The servers compared, one module per peer; the registry is bench.peerlist.

Like bench/__init__.py, this stays import-free so the gevent peer can
monkey-patch first.
"""
