"""A tiny stdio MCP server whose `crash` tool kills the server mid-call (for failure tests)."""

from __future__ import annotations

import os

from mcp.server.fastmcp import FastMCP

server = FastMCP("crashy")


@server.tool()
def ping() -> str:
    """Answer pong."""
    return "pong"


@server.tool()
def crash() -> str:
    """Kill this server process in the middle of the call."""
    os._exit(3)


if __name__ == "__main__":
    server.run()
