"""End to end: everything that starts a server, a CLI or Ray in subprocesses."""
