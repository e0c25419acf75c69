"""HTTP adapters: bytes ⇄ protocol events (httptools for HTTP/1.1, h2 for HTTP/2)."""
