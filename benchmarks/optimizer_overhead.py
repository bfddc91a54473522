"""Optimizer-side time of one ImbSAM step (everything but forward and backward) vs the public code.

    python benchmarks/optimizer_overhead.py [--device cuda] [--reps 30]

The harness lives in ``imbsam_fast.apps.bench.overhead`` (also run by ``imbsam-fast bench``).
"""

from imbsam_fast.apps.bench.overhead import main

if __name__ == "__main__":
    raise SystemExit(main())
