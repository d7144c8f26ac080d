"""The real peers and stand-ins the tests, the benchmarks and the soak share: the bot as a real
process (``botproc``, ``cluster``), a recording Bot Connector (``connector``), the Agents Playground
(``playground``, driven in Chromium by ``browser``), an offline OpenID / Entra ID server (``openid``),
a fake OpenAI server, MCP servers that misbehave, a round-robin proxy, an OTLP collector, and the
peer servers in ``peers/`` (the Cosmos DB wire server, a throwaway PostgreSQL). Not shipped in the
image; nothing in the product imports it."""
