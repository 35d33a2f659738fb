"""Shared test helpers (constants and small builders); fixtures stay in conftest.py."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# A small simulator: every test that trains uses it unless it overrides data.source.*
SMALL_DATA = [
    "data.source.n_users=300",
    "data.source.n_items=200",
    "data.source.impressions_per_user=20",
    "data.batch_size=256",
    "data.eval_batch_size=512",
]
