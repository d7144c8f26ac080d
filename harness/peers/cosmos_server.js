#!/usr/bin/env node
// Starts the Cosmos DB wire-protocol server (npm @vercel/cosmosdb-server) on 127.0.0.1 for tests.
//
// Usage: node harness/peers/cosmos_server.js [PORT]    (or env COSMOS_SERVER_PORT; 0 = any free port)
// The package is looked up in $COSMOS_SERVER_NODE_MODULES, else in the repo root's node_modules.
// Prints one line "cosmosdb-server ready https://127.0.0.1:PORT" once it accepts connections,
// then serves until killed (SIGTERM/SIGINT exit cleanly).
//
// Why a launcher instead of the package's own CLI: its point-read handler
// (lib/handler/read-document) dereferences the stored document before checking that it exists,
// so reading a missing item answers 500 instead of 404. The route table copies the handler when
// lib/routes is first loaded, so the fix has to be installed before the server module is required.
// It also enforces the service's 2 MB request size (413), which the package does not.
"use strict";

const path = require("path");

const modulesDir = process.env.COSMOS_SERVER_NODE_MODULES || path.join(__dirname, "..", "..", "node_modules");
const pkgDir = path.join(modulesDir, "@vercel", "cosmosdb-server");
const lib = (name) => require(path.join(pkgDir, "lib", name));

const readDocument = lib("handler/read-document");
const partitionFromHeader = lib("utils/get-partition-from-header");
const originalReadDocument = readDocument.default;

readDocument.default = (account, req, res, params) => {
  const { dbId, collId, docId } = params;
  const collection = account.database(dbId).collection(collId);
  if (collection.read()) {
    let partition;
    try {
      partition = partitionFromHeader.parsePartitionKey(partitionFromHeader.default(req), docId);
    } catch (err) {
      partition = undefined; // malformed header: let the original handler answer it
    }
    if (partition !== undefined && !collection.document(docId, partition).read()) {
      res.statusCode = 404;
      return { code: "NotFound", message: "Entity with the specified id does not exist in the system." };
    }
  }
  return originalReadDocument(account, req, res, params);
};

const { createHttpsServer } = lib("index");

// The real service refuses a request larger than its 2 MB item limit with 413 "Request size is too
// large"; the package accepts any size. Answer as the service does, before the package sees it.
const MAX_REQUEST_BYTES = 2 * 1024 * 1024;
const enforceRequestSize = (server) => {
  const handlers = server.listeners("request");
  server.removeAllListeners("request");
  server.on("request", (req, res) => {
    if (req.url.startsWith("/_counters")) {
      serveCounters(req, res);
      return;
    }
    countRequest(req);
    if (parseInt(req.headers["content-length"] || "0", 10) > MAX_REQUEST_BYTES) {
      req.resume(); // drain the body, then answer
      req.on("end", () => {
        res.writeHead(413, { "Content-Type": "application/json", "x-ms-activity-id": "size-check" });
        res.end(JSON.stringify({ code: "RequestEntityTooLarge", message: "Request size is too large" }));
      });
      return;
    }
    for (const handler of handlers) handler.call(server, req, res);
  });
  return server;
};

// Request counters for the benchmarks and the request-count tests (GET /_counters; ?reset=1 also
// zeroes them): every request the SDK sends, by operation, and the bytes of the request bodies.
// The real service meters the same operations in request units; this lets the bench count them.
const counters = { requests: 0, bytes_sent: 0, by_operation: {}, log: [] };
const MAX_LOG = 2000;
const isTrue = (value) => String(value).toLowerCase() === "true"; // the SDK sends "True"
const operationOf = (req) => {
  const url = req.url.split("?")[0];
  const parts = url.split("/").filter(Boolean);
  const h = req.headers;
  const onDocs = parts[parts.length - 1] === "docs" || parts[parts.length - 2] === "docs";
  // Not an item operation (account, database, container, partition key ranges): "GET colls" etc.
  if (!onDocs) return `${req.method} ${parts.length % 2 ? parts[parts.length - 1] : parts[parts.length - 2] || "/"}`;
  const single = parts[parts.length - 2] === "docs";
  if (req.method === "POST" && (isTrue(h["x-ms-documentdb-isquery"]) || (h["content-type"] || "").includes("query+json"))) return "query";
  if (req.method === "POST" && isTrue(h["x-ms-cosmos-is-batch-request"])) return "batch";
  if (req.method === "POST") return isTrue(h["x-ms-documentdb-is-upsert"]) ? "upsert" : "create";
  if (single && req.method === "GET") return "read";
  if (single && req.method === "PUT") return "replace";
  if (single && req.method === "PATCH") return "patch";
  if (single && req.method === "DELETE") return "delete";
  return `${req.method} docs`;
};
const countRequest = (req) => {
  const operation = operationOf(req);
  const bytes = parseInt(req.headers["content-length"] || "0", 10) || 0;
  counters.requests += 1;
  counters.bytes_sent += bytes;
  const entry = (counters.by_operation[operation] = counters.by_operation[operation] || { requests: 0, bytes: 0 });
  entry.requests += 1;
  entry.bytes += bytes;
  if (counters.log.length < MAX_LOG) {
    const id = decodeURIComponent(req.url.split("?")[0].split("/docs/")[1] || "").replace(/\/$/, "");
    req.countedEntry = { operation, id, bytes };
    counters.log.push(req.countedEntry);
  }
};
// A create or upsert names its item in the body only: the package's body parser fills the log entry in
// (a batch: the ids of its operations). The package runs a batch as its bulk API does, with a partition
// key per operation; a transactional batch (the SDK's execute_item_batch) has one, in the header, for all
// of them: the same fix-up supplies it. (The package still runs a batch without rollback: no transaction.)
const json = lib("json");
const parseBody = json.default;
json.default = async (req) => {
  const body = await parseBody(req);
  const entry = req.countedEntry;
  if (entry && !entry.id && body && typeof body.id === "string") entry.id = body.id;
  if (isTrue(req.headers["x-ms-cosmos-is-batch-request"]) && Array.isArray(body)) {
    const header = req.headers["x-ms-documentdb-partitionkey"];
    for (const op of body) if (op && op.partitionKey === undefined && header !== undefined) op.partitionKey = header;
    if (entry && !entry.id) entry.id = body.map((op) => (op && (op.id || (op.resourceBody || {}).id)) || "?").join(",");
  }
  return body;
};
const serveCounters = (req, res) => {
  const body = JSON.stringify(counters);
  if (req.url.includes("reset=1")) {
    counters.requests = 0;
    counters.bytes_sent = 0;
    counters.by_operation = {};
    counters.log = [];
  }
  res.writeHead(200, { "Content-Type": "application/json" });
  res.end(body);
};

const port = parseInt(process.argv[2] || process.env.COSMOS_SERVER_PORT || "0", 10);
const server = enforceRequestSize(createHttpsServer()).listen(port, "127.0.0.1", () => {
  const address = server.address();
  console.log(`cosmosdb-server ready https://127.0.0.1:${address.port}`);
});
server.on("error", (err) => {
  console.error(`cosmosdb-server failed: ${err.message}`);
  process.exit(1);
});

const stop = () => {
  server.close(() => process.exit(0));
  setTimeout(() => process.exit(0), 1000).unref(); // do not wait for lingering sockets
};
process.on("SIGTERM", stop);
process.on("SIGINT", stop);
