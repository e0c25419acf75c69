"""agproxy: a gateway for AI agent traffic."""

__version__ = "0.1.0"
