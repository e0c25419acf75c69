"""Configuration: TOML in, a validated model out. See CONFIG.md for the contract."""

from agproxy.config.reader import ConfigError, Problems, Section, parse_duration

__all__ = ["ConfigError", "Problems", "Section", "parse_duration"]
