"""Suite-wide test settings: property tests are reproducible.

Every hypothesis test runs under the ``vramancer`` profile, in CI and locally alike:
``derandomize=True`` draws the examples from a seed derived from each test's own code, so two runs
of one commit try the same inputs (a failure on a clean clone fails again on the next run, and a
pass is not luck); no example database, so what a machine saw before does not change what it
tries next; ``deadline=None``, because a shared CI machine's timing must never fail a test;
``print_blob=True`` prints the ``@reproduce_failure`` line of a failing example. Tests that set
their own ``max_examples`` keep it; the rest draw 100 examples.
"""
from __future__ import annotations

from hypothesis import settings

__all__: list[str] = []

settings.register_profile("vramancer", derandomize=True, database=None, deadline=None, print_blob=True,
                          max_examples=100)
settings.load_profile("vramancer")
