"""Oracles (FlagEmbedding, mteb, ...) are imported through `require`: an oracle test never skips.

A missing or broken oracle fails the test that needs it, with the import error in the message, so a
suite can never go green without comparing a single output against the peer.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


def require(module: str) -> ModuleType:
    """Import `module` (an oracle from the dev extra) or fail the calling test with why it cannot be imported."""
    try:
        return importlib.import_module(module)
    except Exception as exc:  # an oracle's import can fail with any error its own imports raise
        pytest.fail(
            f"oracle {module!r} cannot be imported: {type(exc).__name__}: {exc}\n"
            "Oracles come with the dev extra at the locked versions: scripts/setup.sh dev",
            pytrace=False,
        )
