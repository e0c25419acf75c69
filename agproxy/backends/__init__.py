"""What a route points at: http, agentcore, (later) llm groups and MCP."""
