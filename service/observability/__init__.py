"""Metrics and logs, read from each request's context."""
