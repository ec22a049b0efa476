"""Registers the shared fixtures for every test. The helpers themselves live in the importable
``fixtures`` package (``from fixtures.servers import start_server``); nothing is imported from here."""

pytest_plugins = ["fixtures.data", "fixtures.servers", "fixtures.inprocess", "fixtures.deploy"]
