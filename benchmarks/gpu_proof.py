"""Proof on a real GPU: gpushare itself packs four vLLM servers onto one card.

The command of :mod:`benchmarks.gpuproof` (stack, measurements, phases, report), runnable as a
file from a checkout: ``python benchmarks/gpu_proof.py --out DIR ...`` (see that package).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gpuproof.__main__ import main

if __name__ == "__main__":
    sys.exit(main())
