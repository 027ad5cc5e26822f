"""Command-line tools of the bundle; ``scripts.benchmarking`` holds the measurements of ``benchmark.py``."""
