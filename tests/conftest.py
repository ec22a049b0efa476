"""Registers the shared fixtures for every test. The helpers themselves live in the importable
``fixtures`` package (``from fixtures.servers import start_server``); nothing is imported from here.

The suite runs in a random order (pytest-randomly, from the ``test`` extra): every test must stand
alone. The seed is printed last, also under ``-q``, so a failing order can be run again."""

from __future__ import annotations

import pytest

pytest_plugins = ["fixtures.data", "fixtures.servers", "fixtures.inprocess", "fixtures.deploy"]


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    seed = getattr(config.option, "randomly_seed", None)
    if config.pluginmanager.has_plugin("randomly") and isinstance(seed, int):
        terminalreporter.write_line(f"test order: random, seed {seed} (run this order again: --randomly-seed={seed})")
    else:
        terminalreporter.write_line("test order: as written (pytest-randomly not active)")
