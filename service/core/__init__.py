"""The core: model contracts, sessions, batching, the registry and the data plane (no protocol)."""
