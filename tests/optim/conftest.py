"""Optimizer tests: the small float64 problems with known answers live in ``optim_cases.py``.

The suite runs with ``--import-mode=importlib``, which does not put test folders on ``sys.path``; this folder is
added here so the test modules can ``import optim_cases`` (a name no other test folder uses).
"""

import sys
from pathlib import Path

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))
