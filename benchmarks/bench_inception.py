"""Throughput of FID Inception feature extraction: the same as `repae bench evaluate`.

    python benchmarks/bench_inception.py
"""

from repae.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", "evaluate"]))
