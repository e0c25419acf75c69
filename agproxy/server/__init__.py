"""Listeners, TLS/plaintext sniffing, worker processes, drain and reload."""
