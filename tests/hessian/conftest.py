"""Fixtures for the Hessian tests; the cases themselves are data in ``hessian_cases.py``.

The suite runs with ``--import-mode=importlib``, which does not put test folders on ``sys.path``; this folder is
added here so the test modules can ``import hessian_cases`` (a name no other test folder uses).
"""

import sys
from pathlib import Path

if str(Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
from hessian_cases import CASE_PARAMS, Problem, build  # noqa: E402


@pytest.fixture(params=CASE_PARAMS)
def problem(request) -> Problem:
    """Each case of ``hessian_cases.CASES`` built in float64 on each available device."""
    case, device = request.param
    return build(case, device)
