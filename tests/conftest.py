"""Shared test helpers: tiny configs rooted in a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from cadenza.engine.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "yamls" / "tiny.yaml"


def tiny_config(tmp_path: Path, *overrides: str):
    """``yamls/tiny.yaml`` with its run folder under ``tmp_path`` and the given ``key=value`` overrides."""
    return load_config(TINY, [f"run.logs={tmp_path / 'logs'}", *overrides])


@pytest.fixture
def tiny(tmp_path):
    return lambda *overrides: tiny_config(tmp_path, *overrides)
