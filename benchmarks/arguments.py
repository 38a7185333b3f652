"""Argument checks shared by the benchmark scripts (imported as a sibling module: they run as scripts)."""

from __future__ import annotations

import argparse


def require_at_least(parser: argparse.ArgumentParser, *checks: tuple[str, float, float]) -> None:
    """parser.error (one line, exit status 2) for the first (option, value, minimum) whose value is below it:
    before any model is built or loaded."""
    for option, value, low in checks:
        if value < low:
            parser.error(f"{option} must be >= {low}, got {value}")
