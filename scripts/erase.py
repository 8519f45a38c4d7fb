#!/usr/bin/env python
"""Erase concepts from a Stable Diffusion model: ``erase-concept``'s main (:mod:`erase.cli`) run from a checkout.

python scripts/erase.py --concept "van gogh"
python scripts/erase.py --concept "van gogh" --method esd --lr 1e-3 --steps 200   # LoRA training
python scripts/erase.py --help
"""

from __future__ import annotations

import os
import sys

# This file is named like the package it drives; drop its own folder from the import path so that
# ``import erase`` finds the package, not this script.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from erase.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
