"""Metrics, access log, tracing."""
