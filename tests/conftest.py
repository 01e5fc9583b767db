"""Shared test configuration: the repo root on sys.path, and deterministic property tests in CI."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# CI explores the same property-test examples on every run (a failure there is reproducible from
# its log); elsewhere Hypothesis explores new ones each run, which is how bugs are found.
if os.environ.get("CI"):
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, database=None)
    settings.load_profile("ci")
