"""`make bench`: edgeagent against a naive baseline on this machine (see __main__.py and BENCHMARKS.md)."""
