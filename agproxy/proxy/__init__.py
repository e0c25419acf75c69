"""Route table, Exchange, filter-chain runner, local replies."""
