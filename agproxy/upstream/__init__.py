"""Outbound connections: the pool, HTTP/1.1 and HTTP/2 client connections, simple fetches."""
