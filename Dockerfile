# Durable AI agent for Microsoft Teams: one image for every role (`python app.py`, role from ROLE).
# Build: docker build -t durable-teams-agent .
# One instance (ROLE=all, the default; SQLite in /data or Cosmos DB):
#        docker run -p 3978:3978 -v agent-data:/data --env-file .env durable-teams-agent
# Web and workers (several instances): Cosmos DB and a PostgreSQL JOB_STORE_URL in .env, then
#        docker run -p 3978:3978 --env-file .env -e ROLE=web durable-teams-agent      (any number)
#        docker run --restart unless-stopped --env-file .env -e ROLE=worker durable-teams-agent
#        (two workers: one active, one standby; an active worker that loses PostgreSQL exits
#        with status 70 and must be restarted). `python app.py --role web|worker` works too.
# See docs/deployment.md.

FROM python:3.11-slim

# The image listens on every interface, so it never runs unauthenticated: REQUIRE_AUTHENTICATION
# makes a start without MicrosoftAppId a configuration error (exit status 2), whatever else is set.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=3978 \
    HOST=0.0.0.0 \
    REQUIRE_AUTHENTICATION=true \
    DATA_DIR=/data \
    LOG_FORMAT=json \
    ROLE=all

# An unprivileged user owns only the data directory; the code stays root-owned and read-only to it.
RUN groupadd --system --gid 10001 bot \
    && useradd --system --uid 10001 --gid bot --home-dir /home/bot --create-home --shell /usr/sbin/nologin bot \
    && mkdir -m 0700 /data \
    && chown bot:bot /data

WORKDIR /app

# Dependencies first, so a code change does not reinstall them. Every pinned package has a
# manylinux wheel for amd64 and arm64 except three pure-Python ones: no compiler is needed.
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt

COPY *.py ./
COPY agent/ agent/
COPY bot/ bot/
COPY cluster/ cluster/
COPY dialogs/ dialogs/
COPY examples/ examples/
COPY jobs/ jobs/
COPY runtime/ runtime/
COPY storage/ storage/

# Numeric, so orchestrators that enforce runAsNonRoot can verify it.
USER 10001:10001

# SQLite stores (conversations.sqlite3, jobs.sqlite3) live here. With Cosmos DB only the
# APScheduler job store does, and the bot rebuilds it from Cosmos DB at start-up; with a
# PostgreSQL JOB_STORE_URL (web/worker roles) nothing does.
VOLUME ["/data"]

EXPOSE 3978

# Liveness only (/healthz, which every role serves); orchestrators should probe /readyz for
# readiness (a standby worker is ready). No curl in slim:
# python's urllib, with proxies ignored so an HTTP(S)_PROXY setting cannot capture the probe.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:' + os.environ.get('PORT', '3978') + '/healthz', timeout=4)"]

# Exec form: python is PID 1 and gets SIGTERM, on which aiohttp shuts down gracefully
# (running jobs are handed back; an active worker then releases its lock and a standby takes
# over). app.py reads ROLE from the environment itself; `--role` arguments override it.
CMD ["python", "app.py"]
