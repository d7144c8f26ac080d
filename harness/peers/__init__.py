"""Peer servers the tests start on loopback (Cosmos DB wire server, ...)."""
