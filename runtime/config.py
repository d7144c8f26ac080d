"""Settings, read once from the environment (and a ``.env`` file if present).

Bot Framework names are kept as Microsoft documents them (``MicrosoftAppId`` ...), so the
same environment works for this bot, the samples and the Azure portal's app settings.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


class ConfigError(ValueError):
    """A setting has a value the bot cannot use; the message names the variable."""


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse a minimal ``.env`` (KEY=VALUE lines, # comments, optional quotes)."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[name.strip()] = value
    return values


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    value = _float(env, name, default)
    if not value > 0:
        raise ConfigError(f"{name} must be more than 0, got {env.get(name)!r}")
    return value


def _non_negative(env: Mapping[str, str], name: str, default: int) -> int:
    value = _int(env, name, default)
    if value < 0:
        raise ConfigError(f"{name} must be 0 or more, got {env.get(name)!r}")
    return value


def _system_prompt(env: Mapping[str, str]) -> str:
    """AGENT_SYSTEM_PROMPT, or the text of the file AGENT_SYSTEM_PROMPT_FILE names; blank = the default."""
    text = env.get("AGENT_SYSTEM_PROMPT", "").strip()
    path = env.get("AGENT_SYSTEM_PROMPT_FILE", "").strip()
    if text and path:
        raise ConfigError("set AGENT_SYSTEM_PROMPT or AGENT_SYSTEM_PROMPT_FILE, not both")
    if not path:
        return text
    try:
        text = Path(path).expanduser().read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"AGENT_SYSTEM_PROMPT_FILE: cannot read {path!r}: {exc}") from None
    if not text:
        raise ConfigError(f"AGENT_SYSTEM_PROMPT_FILE: {path!r} is empty")
    return text


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _https_url(env: Mapping[str, str], name: str) -> str:
    raw = env.get(name, "").strip()
    if raw and not (raw.lower().startswith("https://") and len(raw) > len("https://")):
        raise ConfigError(f"{name} must be an https:// URL, got {raw!r}")
    return raw


def _log_format(env: Mapping[str, str]) -> str:
    raw = env.get("LOG_FORMAT", "").strip().lower() or "text"
    if raw not in ("text", "json"):
        raise ConfigError(f"LOG_FORMAT must be text or json, got {raw!r}")
    return raw


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1); a host name is never assumed to be one."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _exposure(env: Mapping[str, str]) -> bool:
    """Refuse to run without authentication where others can reach the bot; ALLOW_UNAUTHENTICATED_NETWORK."""
    local = not env.get("MicrosoftAppId", "").strip()
    allowed = _bool(env, "ALLOW_UNAUTHENTICATED_NETWORK", False)
    if local and _bool(env, "REQUIRE_AUTHENTICATION", False):
        raise ConfigError("REQUIRE_AUTHENTICATION is set but MicrosoftAppId is not: set MicrosoftAppId and "
                          "MicrosoftAppPassword (this bot does not run without authentication here)")
    host = env.get("HOST", "").strip()
    if local and host and not is_loopback(host) and not allowed:
        raise ConfigError(f"HOST={host} without MicrosoftAppId would let anyone who reaches it talk to the bot "
                          "without a token: leave HOST blank (loopback), set MicrosoftAppId/MicrosoftAppPassword, "
                          "or set ALLOW_UNAUTHENTICATED_NETWORK=true to accept that")
    return allowed


def _at_least(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int:
    value = _int(env, name, default)
    if value < minimum:
        raise ConfigError(f"{name} must be {minimum} or more, got {env.get(name)!r}")
    return value


def _ops_token(env: Mapping[str, str]) -> str:
    token = env.get("OPS_TOKEN", "").strip()
    if token and len(token) < 16:
        raise ConfigError("OPS_TOKEN must be at least 16 characters: use a long random value, e.g. the output of "
                          "python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return token


def _ops_port(env: Mapping[str, str]) -> int:
    port = _int(env, "OPS_PORT", 0)
    if not 0 <= port <= 65535:
        raise ConfigError(f"OPS_PORT must be a TCP port (1-65535; 0 or blank: the main port), got {port}")
    if port and port == _int(env, "PORT", 3978):
        raise ConfigError(f"OPS_PORT must differ from PORT ({port}); leave it blank to serve /readyz and /metrics "
                          "on the main port")
    return port


ROLES = ("all", "web", "worker")


def _role(env: Mapping[str, str]) -> str:
    raw = (env.get("ROLE", "") or "all").strip().lower()
    if raw not in ROLES:
        raise ConfigError(f"ROLE (or --role) must be one of {', '.join(ROLES)}, got {raw!r}")
    return raw


def _job_store_url(env: Mapping[str, str]) -> str:
    """JOB_STORE_URL with PostgreSQL spelled for psycopg 3 (the driver we ship); others as given."""
    raw = env.get("JOB_STORE_URL", "").strip()
    for plain in ("postgresql://", "postgres://"):
        if raw.startswith(plain):
            return "postgresql+psycopg://" + raw.removeprefix(plain)
    if raw.startswith("postgresql+") and not raw.startswith("postgresql+psycopg://"):
        raise ConfigError("JOB_STORE_URL: this bot ships the psycopg 3 driver; write postgresql+psycopg://... "
                          f"(or postgresql://...), got {raw.split('://', 1)[0]}://...")
    return raw


def _csv(env: Mapping[str, str], name: str) -> frozenset[str]:
    return frozenset(part.strip().lower() for part in env.get(name, "").split(",") if part.strip())


_OBJECT_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _object_ids(env: Mapping[str, str], name: str) -> frozenset[str]:
    """Comma-separated Entra ID (AAD) object ids (GUIDs), lower-cased; anything else is a ConfigError."""
    ids = _csv(env, name)
    if wrong := sorted(i for i in ids if not _OBJECT_ID.match(i)):
        raise ConfigError(f"{name} must list Entra ID (AAD) object ids (GUIDs such as "
                          f"00000000-0000-0000-0000-000000000000, found in Entra ID > Users > Object ID), got "
                          f"{', '.join(repr(w) for w in wrong[:3])}")
    return ids


def _names(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """Comma-separated names or globs, as written (tool names are case-sensitive)."""
    return tuple(part.strip() for part in env.get(name, "").split(",") if part.strip())


#: Bot Framework endpoint overrides, under the names botbuilder reads (sovereign/private clouds, tests).
#: Blank: the public Azure values. See bot/auth.py ``endpoint_settings``.
BOT_FRAMEWORK_ENDPOINT_SETTINGS = (
    "TO_BOT_FROM_CHANNEL_OPENID_METADATA_URL",
    "TO_BOT_FROM_CHANNEL_TOKEN_ISSUER",
    "TO_BOT_FROM_EMULATOR_OPENID_METADATA_URL",
    "TO_CHANNEL_FROM_BOT_LOGIN_URL",
    "TO_CHANNEL_FROM_BOT_OAUTH_SCOPE",
    "OAUTH_URL",
)


@dataclass(frozen=True)
class Settings:
    port: int = 3978
    #: HOST as given; blank = loopback in local mode, every interface when authenticated (see listen_host).
    host: str = ""
    app_id: str = ""
    app_password: str = ""
    app_type: str = "MultiTenant"
    app_tenant_id: str = ""
    data_dir: Path = Path("data")
    cosmos_endpoint: str = ""
    cosmos_key: str = ""
    cosmos_database: str = "durable-agent"
    cosmos_container: str = "conversations"
    job_store_url: str = ""
    #: ROLE / --role: ``all`` (web and worker in one process), ``web`` (ingest) or ``worker`` (agent, jobs, sends).
    role: str = "all"
    #: WORK_SWEEP_SECONDS: how often the active worker looks for work a lost notification left behind.
    work_sweep_seconds: float = 10.0
    openai_api_key: str = ""
    openai_model: str = ""
    openai_base_url: str = ""
    azure_openai_endpoint: str = ""
    azure_openai_deployment: str = ""
    azure_openai_api_version: str = "2024-10-21"
    azure_openai_api_key: str = ""
    model_timeout_seconds: float = 60.0
    model_max_retries: int = 2
    agent_system_prompt: str = ""  # the text; blank = the built-in default (agent/runner.py)
    agent_system_prompt_file: str = ""  # where it was read from, if from a file
    #: Modules declaring tools with ``@tool`` (jobs/registry.py), imported once at start-up.
    tool_modules: tuple[str, ...] = ("jobs.activate_line",)
    context_messages: int = 40
    conversation_ttl_days: int = 30
    connector_timeout_seconds: float = 30.0
    #: SEND_RATE_PER_CONVERSATION: messages per second the bot sends into one conversation (Teams allows
    #: about 7 and answers more with 429); 0 turns the pacing off, for a connector that does not throttle.
    send_rate_per_conversation: int = 7
    mcp_config: Path = Path("mcp.json")
    log_level: str = "INFO"
    #: LOG_FORMAT: ``text`` (for people) or ``json`` (one object per line, for log collectors).
    log_format: str = "text"
    #: ALLOWED_TENANTS: lower-case tenant ids; empty = every tenant may use the bot.
    allowed_tenants: frozenset[str] = frozenset()
    #: Bot Framework endpoint overrides by botbuilder setting name (only the ones set).
    bot_framework_endpoints: tuple[tuple[str, str], ...] = ()
    #: VALIDATE_AUTHORITY: let MSAL check a custom TO_CHANNEL_FROM_BOT_LOGIN_URL with Microsoft.
    validate_authority: bool = True
    # --- service URLs (bot/service_urls.py) ---
    #: TRUSTED_SERVICE_URLS: the Bot Connector URLs replies may go to (patterns); empty = the mode's default.
    trusted_service_urls: tuple[str, ...] = ()
    # --- edge security (issue 13: exposure, Emulator tokens, request limits, ops endpoints) ---
    #: ALLOW_UNAUTHENTICATED_NETWORK: local mode (no MicrosoftAppId) may listen on a non-loopback HOST.
    allow_unauthenticated_network: bool = False
    #: REQUIRE_AUTHENTICATION: refuse to start in local mode at all (the Docker image sets it).
    require_authentication: bool = False
    #: ALLOW_EMULATOR_TOKENS: accept tokens the Bot Framework Emulator obtains, in authenticated mode.
    allow_emulator_tokens: bool = False
    #: BODY_READ_TIMEOUT_SECONDS: how long the body of a POST /api/messages may take to arrive (then 408).
    body_read_timeout_seconds: float = 10.0
    #: MAX_JSON_DEPTH: deepest nesting of arrays/objects accepted in an activity (deeper: 400).
    max_json_depth: int = 64
    #: OPS_TOKEN: when set, /readyz and /metrics need ``Authorization: Bearer <OPS_TOKEN>``.
    ops_token: str = ""
    #: OPS_PORT: when set (not 0), /readyz and /metrics are served on this port only, at OPS_HOST.
    ops_port: int = 0
    ops_host: str = "127.0.0.1"
    # --- tool policy, job ownership and job caps (agent/tool_policy.py, jobs/access.py, jobs/caps.py) ---
    #: ENABLED_TOOLS: tool names or globs the agent may use (default every tool).
    enabled_tools: tuple[str, ...] = ("*",)
    #: DISABLED_TOOLS: tool names or globs no one may use, whatever ENABLED_TOOLS says.
    disabled_tools: tuple[str, ...] = ()
    #: TOOL_POLICY_FILE: JSON restricting tools to tenants / AAD object ids; read at start-up.
    tool_policy_file: str = ""
    #: ADMINS: lower-case AAD object ids that may cancel anyone's job.
    admins: frozenset[str] = frozenset()
    #: MAX_ACTIVE_JOBS_PER_CONVERSATION / _PER_USER: queued or running jobs allowed (0 = no cap).
    max_active_jobs_per_conversation: int = 10
    max_active_jobs_per_user: int = 5
    # --- abuse limits (bot/rate_limits.py, agent/budget.py); 0 turns a limit off ---
    #: RATE_LIMIT_USER_BURST / _PER_MINUTE: messages one sender may send at once / sustained (all conversations).
    rate_limit_user_burst: int = 10
    rate_limit_user_per_minute: int = 20
    #: RATE_LIMIT_CONVERSATION_BURST / _PER_MINUTE: the same for one conversation, all senders together.
    rate_limit_conversation_burst: int = 30
    rate_limit_conversation_per_minute: int = 60
    #: MAX_PENDING_EVENTS: unprocessed inbox events a conversation may hold before messages are refused.
    max_pending_events: int = 50
    #: DAILY_TOKEN_BUDGET_PER_TENANT / _PER_CONVERSATION: model tokens (prompt + completion) per UTC day.
    daily_token_budget_per_tenant: int = 0
    daily_token_budget_per_conversation: int = 200_000
    # --- untrusted content and size limits (issue 13, findings 11, 15, 16) ---
    #: MAX_TOOL_RESULT_CHARS: a tool / MCP / job result is clipped to this before it is stored or
    #: shown to the model ("[clipped: N of M characters shown]").
    max_tool_result_chars: int = 8000
    #: STORE_MAX_ITEM_BYTES: the largest item a store writes (Cosmos DB's 2 MB by default); a turn
    #: whose result is larger is dropped as a permanent failure and the user told.
    store_max_item_bytes: int = 2 * 1024 * 1024
    # --- durable human approval (issue 16, jobs/approval.py) ---
    #: APPROVAL_REQUIRED_TOOLS: long-running tools that wait for a person's yes (beside ``@tool(approval=True)``).
    approval_required_tools: tuple[str, ...] = ()
    #: APPROVERS: lower-case AAD object ids who may decide any request, beside the person who asked.
    approvers: frozenset[str] = frozenset()
    #: APPROVAL_TIMEOUT_HOURS: how long a request waits before it expires.
    approval_timeout_hours: float = 72.0
    # --- replies like a Teams AI agent (issue 15: streaming, AI label, feedback, citations) ---
    #: STREAMING: stream answers in one-on-one Teams chats (false: typing indicator and one message).
    streaming: bool = True
    #: STREAM_INTERVAL_SECONDS: the least time between two updates of a stream (Teams throttles faster).
    stream_interval_seconds: float = 1.0
    #: STREAM_MAX_SECONDS: a stream is closed this long after it opened (Teams ends streams at 2 minutes);
    #: the rest of the answer follows as a new message.
    stream_max_seconds: float = 110.0
    # --- many active workers (issue 18, cluster/postgres.py, cluster/partitions.py) ---
    #: PARTITIONS: how many partitions the conversations are spread over (the same on every instance).
    partitions: int = 16
    #: PARTITION_LEASE_SECONDS: how long a worker's hold on a partition lasts unless renewed.
    partition_lease_seconds: float = 15.0
    #: PARTITION_RENEW_SECONDS: how often a worker renews its leases and rebalances (below the lease).
    partition_renew_seconds: float = 5.0

    @property
    def local_mode(self) -> bool:
        """No app id: the Emulator / Agents Playground talk to us without tokens."""
        return not self.app_id

    @property
    def listen_host(self) -> str:
        """Where the main port listens: HOST, or by default loopback in local mode (nobody else can
        reach an unauthenticated bot) and every interface in authenticated mode."""
        return self.host or ("127.0.0.1" if self.local_mode else "0.0.0.0")

    @property
    def security_warnings(self) -> list[str]:
        """Risky but allowed choices, logged as warnings at every start."""
        warnings = []
        if self.local_mode and not is_loopback(self.listen_host):
            warnings.append(f"local mode (no MicrosoftAppId) listening on HOST={self.listen_host}: anyone who can "
                            "reach this address can talk to the bot without a token (ALLOW_UNAUTHENTICATED_NETWORK"
                            "=true)")
        if not self.local_mode and self.allow_emulator_tokens:
            warnings.append("ALLOW_EMULATOR_TOKENS=true: tokens the Bot Framework Emulator obtains are accepted; "
                            "for testing only, never in a tenant")
        if not self.local_mode and not self.ops_token and not self.ops_port and not is_loopback(self.listen_host):
            warnings.append("/readyz and /metrics are open to whoever reaches the port: set OPS_TOKEN or OPS_PORT")
        return warnings

    @property
    def sqlite_path(self) -> Path:
        return self.data_dir / "conversations.sqlite3"

    @property
    def effective_job_store_url(self) -> str:
        return self.job_store_url or f"sqlite:///{(self.data_dir / 'jobs.sqlite3').resolve()}"

    @property
    def shared_job_store(self) -> bool:
        """A PostgreSQL job store, which also carries the coordination between instances."""
        return self.job_store_url.startswith("postgresql+psycopg://")

    @property
    def sole_ingest(self) -> bool:
        """The only process taking messages in for its store: ``ROLE=all`` without PostgreSQL (one instance
        per store, README "Running several instances"), so it sees every append and dialog state write."""
        return self.role == "all" and not self.shared_job_store

    @property
    def coordination_url(self) -> str:
        """The job store's database as a libpq URL (psycopg's own connections: lock, LISTEN/NOTIFY)."""
        return "postgresql://" + self.job_store_url.removeprefix("postgresql+psycopg://")

    @property
    def serves_web(self) -> bool:
        return self.role in ("all", "web")

    @property
    def runs_worker(self) -> bool:
        return self.role in ("all", "worker")

    @property
    def model_description(self) -> str:
        if self.azure_openai_endpoint:
            return f"Azure OpenAI deployment {self.azure_openai_deployment!r}"
        if self.openai_api_key or self.openai_base_url:
            return f"OpenAI-compatible model {self.openai_model or 'gpt-4o-mini'!r}"
        return "the offline model (no model configured)"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, dotenv: Path | None = Path(".env")) -> Settings:
        merged: dict[str, str] = dict(read_dotenv(dotenv)) if dotenv else {}
        merged.update(os.environ if env is None else env)
        e = merged
        if e.get("AZURE_OPENAI_ENDPOINT", "").strip() and not e.get("AZURE_OPENAI_DEPLOYMENT", "").strip():
            raise ConfigError("AZURE_OPENAI_ENDPOINT is set but AZURE_OPENAI_DEPLOYMENT is not: name the deployment "
                              "to call (Azure portal or AI Foundry: Deployments)")
        role, job_store_url = _role(e), _job_store_url(e)
        if role != "all" and not job_store_url.startswith("postgresql+psycopg://"):
            raise ConfigError(f"--role {role} needs a shared PostgreSQL job store: set JOB_STORE_URL to "
                              "postgresql://USER:PASSWORD@HOST:5432/DATABASE (it also carries the wake-ups and "
                              "the choice of the active worker)")
        lease, renew = _positive(e, "PARTITION_LEASE_SECONDS", 15.0), _positive(e, "PARTITION_RENEW_SECONDS", 5.0)
        if renew * 2 > lease:
            raise ConfigError(f"PARTITION_RENEW_SECONDS ({renew:g}) must be at most half of PARTITION_LEASE_SECONDS "
                              f"({lease:g}): a lease must survive a late renewal")
        return cls(
            port=_int(e, "PORT", 3978),
            host=e.get("HOST", "").strip(),
            app_id=e.get("MicrosoftAppId", "").strip(),
            app_password=e.get("MicrosoftAppPassword", ""),
            app_type=e.get("MicrosoftAppType", "") or "MultiTenant",
            app_tenant_id=e.get("MicrosoftAppTenantId", ""),
            data_dir=Path(e.get("DATA_DIR", "") or "data"),
            cosmos_endpoint=e.get("COSMOS_ENDPOINT", ""),
            cosmos_key=e.get("COSMOS_KEY", ""),
            cosmos_database=e.get("COSMOS_DATABASE", "") or "durable-agent",
            cosmos_container=e.get("COSMOS_CONTAINER", "") or "conversations",
            job_store_url=job_store_url,
            role=role,
            work_sweep_seconds=_positive(e, "WORK_SWEEP_SECONDS", 10.0),
            openai_api_key=e.get("OPENAI_API_KEY", ""),
            openai_model=e.get("OPENAI_MODEL", ""),
            openai_base_url=e.get("OPENAI_BASE_URL", ""),
            azure_openai_endpoint=e.get("AZURE_OPENAI_ENDPOINT", ""),
            azure_openai_deployment=e.get("AZURE_OPENAI_DEPLOYMENT", ""),
            azure_openai_api_version=e.get("AZURE_OPENAI_API_VERSION", "") or "2024-10-21",
            azure_openai_api_key=e.get("AZURE_OPENAI_API_KEY", ""),
            model_timeout_seconds=_positive(e, "OPENAI_TIMEOUT_SECONDS", 60.0),
            model_max_retries=_non_negative(e, "OPENAI_MAX_RETRIES", 2),
            agent_system_prompt=_system_prompt(e),
            agent_system_prompt_file=e.get("AGENT_SYSTEM_PROMPT_FILE", "").strip(),
            tool_modules=_names(e, "TOOL_MODULES") if "TOOL_MODULES" in e else ("jobs.activate_line",),
            context_messages=_int(e, "AGENT_CONTEXT_MESSAGES", 40),
            conversation_ttl_days=_int(e, "CONVERSATION_TTL_DAYS", 30),
            connector_timeout_seconds=_float(e, "CONNECTOR_TIMEOUT_SECONDS", 30.0),
            send_rate_per_conversation=_non_negative(e, "SEND_RATE_PER_CONVERSATION", 7),
            mcp_config=Path(e.get("MCP_CONFIG", "") or "mcp.json"),
            log_level=(e.get("LOG_LEVEL", "") or "INFO").upper(),
            log_format=_log_format(e),
            allowed_tenants=_csv(e, "ALLOWED_TENANTS"),
            bot_framework_endpoints=tuple(
                (name, value) for name in BOT_FRAMEWORK_ENDPOINT_SETTINGS
                if (value := (_https_url(e, name) if name.endswith("_URL") else e.get(name, "").strip()))
            ),
            validate_authority=_bool(e, "VALIDATE_AUTHORITY", True),
            # --- service URLs ---
            trusted_service_urls=tuple(p.strip() for p in e.get("TRUSTED_SERVICE_URLS", "").split(",") if p.strip()),
            # --- edge security (issue 13) ---
            allow_unauthenticated_network=_exposure(e),
            require_authentication=_bool(e, "REQUIRE_AUTHENTICATION", False),
            allow_emulator_tokens=_bool(e, "ALLOW_EMULATOR_TOKENS", False),
            body_read_timeout_seconds=_positive(e, "BODY_READ_TIMEOUT_SECONDS", 10.0),
            max_json_depth=_at_least(e, "MAX_JSON_DEPTH", 64, minimum=8),
            ops_token=_ops_token(e),
            ops_port=_ops_port(e),
            ops_host=e.get("OPS_HOST", "").strip() or "127.0.0.1",
            # tool policy, job ownership and job caps
            enabled_tools=_names(e, "ENABLED_TOOLS") or ("*",),
            disabled_tools=_names(e, "DISABLED_TOOLS"),
            tool_policy_file=e.get("TOOL_POLICY_FILE", "").strip(),
            admins=_csv(e, "ADMINS"),
            max_active_jobs_per_conversation=_non_negative(e, "MAX_ACTIVE_JOBS_PER_CONVERSATION", 10),
            max_active_jobs_per_user=_non_negative(e, "MAX_ACTIVE_JOBS_PER_USER", 5),
            # abuse limits
            rate_limit_user_burst=_non_negative(e, "RATE_LIMIT_USER_BURST", 10),
            rate_limit_user_per_minute=_non_negative(e, "RATE_LIMIT_USER_PER_MINUTE", 20),
            rate_limit_conversation_burst=_non_negative(e, "RATE_LIMIT_CONVERSATION_BURST", 30),
            rate_limit_conversation_per_minute=_non_negative(e, "RATE_LIMIT_CONVERSATION_PER_MINUTE", 60),
            max_pending_events=_non_negative(e, "MAX_PENDING_EVENTS", 50),
            daily_token_budget_per_tenant=_non_negative(e, "DAILY_TOKEN_BUDGET_PER_TENANT", 0),
            daily_token_budget_per_conversation=_non_negative(e, "DAILY_TOKEN_BUDGET_PER_CONVERSATION", 200_000),
            # --- untrusted content and size limits ---
            max_tool_result_chars=_at_least(e, "MAX_TOOL_RESULT_CHARS", 8000, minimum=100),
            store_max_item_bytes=_at_least(e, "STORE_MAX_ITEM_BYTES", 2 * 1024 * 1024, minimum=16 * 1024),
            # --- durable human approval (issue 16) ---
            approval_required_tools=_names(e, "APPROVAL_REQUIRED_TOOLS"),
            approvers=_object_ids(e, "APPROVERS"),
            approval_timeout_hours=_positive(e, "APPROVAL_TIMEOUT_HOURS", 72.0),
            # --- replies like a Teams AI agent (issue 15) ---
            streaming=_bool(e, "STREAMING", True),
            stream_interval_seconds=_positive(e, "STREAM_INTERVAL_SECONDS", 1.0),
            stream_max_seconds=_positive(e, "STREAM_MAX_SECONDS", 110.0),
            # --- many active workers (issue 18) ---
            partitions=_at_least(e, "PARTITIONS", 16, minimum=1),
            partition_lease_seconds=lease,
            partition_renew_seconds=renew,
        )

