"""Real model clients (autogen-ext over the openai SDK) against a local chat-completions server.

Each provider's client is built by ``create_model_client`` from ``Settings`` and driven through
the real turn runner, so the requests checked here are the ones the bot sends: paths, auth
headers, bodies, tool calls and their results, retries. Failures become an ``AgentError`` whose
user message says what went wrong, and the processor keeps the conversation's state.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from autogen_core.models import ChatCompletionClient
from autogen_ext.models.openai import OpenAIChatCompletionClient  # imported here, not on the event loop
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError
from azure.identity.aio import get_bearer_token_provider  # noqa: F401  (imported here, not on the event loop)

from agent.models import ModelCallRecorder, create_model_client, provider_of
from agent.offline_model import OfflineChatCompletionClient
from agent.processor import ConversationProcessor, text_activity
from agent.runner import DEFAULT_SYSTEM_MESSAGE, AgentTurnRunner
from agent.tools import turn_tools
from agent.turns import AgentError, AgentInput, TurnOutcome
from harness import fake_openai as fm
from harness.botproc import free_port
from harness.fake_openai import FakeOpenAI
from jobs.activate_line import make_activate_line_tool
from jobs.registry import JobRegistry
from jobs.runner import JobRunner
from runtime.config import ConfigError, Settings
from runtime.untrusted import tool_output_data
from storage.abc import JSON, InboxEvent
from storage.memory import MemoryStore

KEY = "emulator:c1"
REFERENCE = {"conversation": {"id": "c1"}, "serviceUrl": "http://127.0.0.1:9/"}


@pytest.fixture(scope="module", autouse=True)
def _lazy_imports_done() -> None:
    """The clients import parts of openai/httpx on first use; the bot builds them at start-up, before
    its event loop runs. Do the same once here so blockbuster only sees what a turn does."""
    create_model_client(Settings(openai_api_key="sk-test"))
    create_model_client(Settings(azure_openai_endpoint="https://x", azure_openai_deployment="d",
                                 azure_openai_api_key="k"))


class Clients:
    """Builds clients with ``create_model_client`` and closes them when the test ends."""

    def __init__(self) -> None:
        self.made: list[ChatCompletionClient] = []

    def __call__(self, settings: Settings, **kwargs: Any) -> ChatCompletionClient:
        client = create_model_client(settings, **kwargs)
        self.made.append(client)
        return client


@pytest.fixture
async def clients() -> AsyncIterator[Clients]:
    clients = Clients()
    yield clients
    for made in clients.made:
        await made.close()


def openai_settings(fake: FakeOpenAI, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"openai_api_key": "sk-test", "openai_base_url": fake.openai_base_url,
                              "openai_model": "test-model", "model_timeout_seconds": 5.0, "model_max_retries": 0}
    return Settings(**{**values, **overrides})


def azure_settings(fake: FakeOpenAI, **overrides: Any) -> Settings:
    values: dict[str, Any] = {"azure_openai_endpoint": fake.azure_endpoint, "azure_openai_deployment": "my-deploy",
                              "azure_openai_api_key": "azure-key", "model_timeout_seconds": 5.0,
                              "model_max_retries": 0}
    return Settings(**{**values, **overrides})


def make_runner(client: ChatCompletionClient, store: MemoryStore | None = None,
                system_message: str = DEFAULT_SYSTEM_MESSAGE) -> AgentTurnRunner:
    store = store or MemoryStore()
    registry = JobRegistry([make_activate_line_tool(1)])
    jobs = JobRunner(store, registry, lambda key: None)
    return AgentTurnRunner(client, lambda scope: turn_tools(scope, registry, store, jobs),
                           system_message=system_message)


async def turn(client: ChatCompletionClient, text: str, state: JSON | None = None) -> TurnOutcome:
    return await make_runner(client).run(KEY, state, [AgentInput(text)])


async def failure(client: ChatCompletionClient, text: str = "hello") -> AgentError:
    with pytest.raises(AgentError) as caught:
        await turn(client, text)
    return caught.value


# --- providers: what goes over the wire ----------------------------------------------------


async def test_openai_compatible_server_gets_bearer_key_model_tools_and_system_prompt(clients: Clients,
                                                                                      fake: FakeOpenAI) -> None:
    fake.enqueue(fm.text("Hello from the model."))
    outcome = await turn(clients(openai_settings(fake)), "hi there")
    assert outcome.replies == ["Hello from the model."]
    [request] = fake.requests()
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.headers["authorization"] == "Bearer sk-test"
    assert "api-key" not in request.headers
    assert request.body is not None and request.body["model"] == "test-model"
    assert request.system_prompt == DEFAULT_SYSTEM_MESSAGE
    assert request.last_message == {"role": "user", "content": "hi there", "name": "user"}
    assert {"activate_new_line", "get_job_status", "list_jobs", "cancel_job"} <= set(request.tool_names)


async def test_a_server_without_a_key_gets_a_placeholder(clients: Clients, fake: FakeOpenAI) -> None:
    """Ollama, vLLM and llama.cpp need no key; the SDK insists on one, so a placeholder is sent."""
    await turn(clients(openai_settings(fake, openai_api_key="")), "hi")
    assert fake.requests()[0].headers["authorization"] == "Bearer not-needed"


async def test_azure_openai_uses_the_deployment_url_api_version_and_api_key_header(clients: Clients,
                                                                                   fake: FakeOpenAI) -> None:
    model = clients(azure_settings(fake, azure_openai_api_version="2024-06-01"))
    outcome = await turn(model, "hi there")
    assert outcome.replies == ["echo: hi there"]
    [request] = fake.requests()
    assert request.path == "/openai/deployments/my-deploy/chat/completions"
    assert request.query == {"api-version": "2024-06-01"}
    assert request.headers["api-key"] == "azure-key"
    assert "authorization" not in request.headers
    assert request.deployment == "my-deploy"


class FakeCredential:
    """An azure.core async token credential that hands out a fixed token (no network)."""

    def __init__(self) -> None:
        self.scopes: list[tuple[str, ...]] = []

    async def get_token(self, *scopes: str, **kwargs: Any) -> Any:
        self.scopes.append(scopes)
        return AccessToken("entra-token", int(time.time()) + 3600)

    async def close(self) -> None:
        return None


async def test_azure_openai_without_a_key_sends_an_entra_id_bearer_token(clients: Clients, fake: FakeOpenAI) -> None:
    credential = FakeCredential()
    model = clients(azure_settings(fake, azure_openai_api_key=""), azure_credential=credential)
    await turn(model, "hi")
    [request] = fake.requests()
    assert request.headers["authorization"] == "Bearer entra-token"
    assert "api-key" not in request.headers
    assert credential.scopes == [("https://cognitiveservices.azure.com/.default",)]


def test_no_model_settings_mean_the_offline_model() -> None:
    client = create_model_client(Settings())
    assert isinstance(client, OfflineChatCompletionClient)
    assert provider_of(client).name == "offline"


def test_clients_get_the_configured_timeout_and_retries(fake: FakeOpenAI) -> None:
    for settings in (openai_settings(fake, model_timeout_seconds=12.5, model_max_retries=4),
                     azure_settings(fake, model_timeout_seconds=12.5, model_max_retries=4)):
        client: Any = create_model_client(settings)
        assert (client._client.timeout, client._client.max_retries) == (12.5, 4)
    defaults: Any = create_model_client(Settings(openai_api_key="sk-test"))
    assert isinstance(defaults, OpenAIChatCompletionClient)
    assert (defaults._client.timeout, defaults._client.max_retries) == (60.0, 2)
    assert provider_of(defaults).name == "OpenAI"
    assert provider_of(ModelCallRecorder(defaults)).credentials == "OPENAI_API_KEY"


def test_an_unknown_openai_model_name_still_gets_a_client() -> None:
    client = create_model_client(Settings(openai_api_key="sk-test", openai_model="gpt-99-preview"))
    assert client.model_info["function_calling"] is True


# --- tools ----------------------------------------------------------------------------------


async def test_a_tool_call_from_the_model_schedules_a_job_and_the_model_sees_the_result(clients: Clients,
                                                                                        fake: FakeOpenAI) -> None:
    fake.enqueue(fm.tool_calls(fm.tool_call("activate_new_line", {"phone_number": "555-0100"}, "call_1")))
    outcome = await turn(clients(openai_settings(fake)), "please activate 555-0100")
    [job] = outcome.new_jobs
    assert (job.tool, job.arguments, job.call_id) == ("activate_new_line", {"phone_number": "555-0100"}, "call_1")
    second = fake.requests()[1]
    [result] = second.tool_results
    assert result["tool_call_id"] == "call_1" and json.loads(tool_output_data(result["content"]))["job_id"] == job.id
    assert second.messages[-2]["tool_calls"][0]["function"]["name"] == "activate_new_line"
    assert outcome.replies == [f"I've started activating line 555-0100 (job `{job.id}`). It takes about 1 seconds; "
                               "I'll message you here when it's done."]


@pytest.mark.parametrize(("arguments", "error"), [
    ("{\"phone_number\": \"555-01", "Error: "),  # truncated JSON
    ("not json at all", "Error: "),
    ({"phone_number": 5550100}, "phone_number: Input should be a valid string"),  # wrong type
    ({"number": "555-0100"}, "phone_number: Field required"),  # wrong name
    ("[\"555-0100\"]", "Input should be a valid dictionary"),  # JSON, but not an object
    ({"phone_number": "banana"}, "'banana' is not a phone number"),  # the tool's own validation
])
async def test_malformed_tool_arguments_become_a_tool_error_the_model_sees(clients: Clients,
                                                                           fake: FakeOpenAI, arguments: Any,
                                                                          error: str) -> None:
    fake.enqueue(fm.tool_calls(fm.tool_call("activate_new_line", arguments, "call_bad")),
                 fm.text("I could not start that: the number looks wrong. Which number?"))
    outcome = await turn(clients(openai_settings(fake)), "activate my line")
    assert outcome.new_jobs == []
    assert outcome.replies == ["I could not start that: the number looks wrong. Which number?"]
    second = fake.requests()[1]
    [result] = second.tool_results
    assert result["tool_call_id"] == "call_bad"
    assert error in result["content"], result["content"]
    assert "errors.pydantic.dev" not in result["content"]
    # The history sent on is valid JSON (vLLM, llama.cpp parse it); the stored call is what the model said.
    sent = second.messages[-2]["tool_calls"][0]["function"]["arguments"]
    assert isinstance(json.loads(sent), dict)
    [stored_call] = [c for m in outcome.state["agent_states"]["assistant"]["agent_state"]["llm_context"]["messages"]
                     if m["type"] == "AssistantMessage" and isinstance(m["content"], list) for c in m["content"]]
    assert stored_call["arguments"] == (arguments if isinstance(arguments, str) else json.dumps(arguments))
    # The state is usable: the next turn continues the conversation with the error in context.
    again = await turn(clients(openai_settings(fake)), "555-0100", outcome.state)
    assert again.replies == ["echo: 555-0100"]


async def test_a_call_to_a_tool_that_does_not_exist_is_an_error_for_the_model(clients: Clients,
                                                                              fake: FakeOpenAI) -> None:
    fake.enqueue(fm.tool_calls(fm.tool_call("format_disk", {}, "call_x")))
    outcome = await turn(clients(openai_settings(fake)), "hi")
    [result] = fake.requests()[1].tool_results
    assert "format_disk" in result["content"] and "not found" in result["content"]
    assert outcome.replies == [result["content"]]


# --- failures ---------------------------------------------------------------------------------


async def test_a_slow_model_times_out_with_a_clear_message(clients: Clients, fake: FakeOpenAI) -> None:
    fake.enqueue(fm.text("too late", delay=3))
    started = time.monotonic()
    error = await failure(clients(openai_settings(fake, model_timeout_seconds=0.5)))
    assert time.monotonic() - started < 2.5
    assert error.cause == "timeout"
    assert "the model took too long" in error.user_message and "try again" in error.user_message
    assert "OPENAI_TIMEOUT_SECONDS" in str(error) and "/v1/chat/completions" in str(error)


async def test_a_timeout_is_retried_within_the_budget(clients: Clients, fake: FakeOpenAI) -> None:
    fake.enqueue(fm.text("too late", delay=3), fm.text("second time lucky"))
    outcome = await turn(clients(openai_settings(fake, model_timeout_seconds=0.5, model_max_retries=1)),
                         "hi")
    assert outcome.replies == ["second time lucky"]


async def test_429_is_retried_after_retry_after(clients: Clients, fake: FakeOpenAI) -> None:
    fake.enqueue(fm.rate_limited(retry_after=1), fm.text("after the wait"))
    outcome = await turn(clients(openai_settings(fake, model_max_retries=2)), "hi")
    assert outcome.replies == ["after the wait"]
    first, second = fake.requests()
    assert second.time - first.time >= 0.95
    assert (first.headers["x-stainless-retry-count"], second.headers["x-stainless-retry-count"]) == ("0", "1")


async def test_429_beyond_the_retries_says_the_service_is_busy(clients: Clients, fake: FakeOpenAI) -> None:
    fake.enqueue(*[fm.rate_limited(retry_after=0.1)] * 2)
    error = await failure(clients(openai_settings(fake, model_max_retries=1)))
    assert len(fake.requests()) == 2
    assert error.cause == "rate_limited"
    assert "busy (rate limited)" in error.user_message and "try again" in error.user_message
    assert "HTTP 429 after 1 retries" in str(error) and "Retry-After: 0.1" in str(error)


async def test_500_is_retried_then_reported(clients: Clients, fake: FakeOpenAI) -> None:
    fake.enqueue(fm.error(500, "The server had an error while processing your request.", type="server_error"),
                 fm.text("recovered"))
    outcome = await turn(clients(openai_settings(fake, model_max_retries=1)), "hi")
    assert outcome.replies == ["recovered"]

    fake.enqueue(*[fm.error(503, "Service Unavailable")] * 2)
    error = await failure(clients(openai_settings(fake, model_max_retries=1)))
    assert error.cause == "server_error"
    assert "internal error (HTTP 503)" in error.user_message and "try again" in error.user_message
    assert "Service Unavailable" in str(error)


@pytest.mark.parametrize(("provider", "header", "names"), [
    ("openai", "authorization", "OPENAI_API_KEY"),
    ("azure", "api-key", "AZURE_OPENAI_API_KEY"),
])
async def test_a_wrong_key_names_the_setting_to_check(clients: Clients, fake: FakeOpenAI, provider: str, header: str,
                                                       names: str) -> None:
    fake.require_auth(header, "the-right-one")
    settings = openai_settings(fake, model_max_retries=2) if provider == "openai" else azure_settings(
        fake, model_max_retries=2)
    error = await failure(clients(settings))
    assert len(fake.requests()) == 1  # a 401 is not retried
    assert error.cause == "auth" and error.log_level == logging.ERROR
    assert "refused my credentials" in error.user_message and names in error.user_message
    assert "HTTP 401" in str(error) and names in str(error)


async def test_a_failing_entra_id_sign_in_is_an_auth_failure(clients: Clients, fake: FakeOpenAI) -> None:
    class NoIdentity(FakeCredential):
        async def get_token(self, *scopes: str, **kwargs: Any) -> Any:
            raise ClientAuthenticationError("DefaultAzureCredential failed to retrieve a token")

    model = clients(azure_settings(fake, azure_openai_api_key=""), azure_credential=NoIdentity())
    error = await failure(model)
    assert fake.requests() == []
    assert error.cause == "auth" and "Entra ID" in error.user_message


@pytest.mark.parametrize(("reply", "cause", "phrase"), [
    (fm.text(None, finish_reason="content_filter"), "content_filter", "my answer was blocked by the content filter"),
    (fm.content_filtered_prompt(), "content_filter", "the content filter blocked this request"),
    (fm.error(403, "Public access is disabled."), "auth", "denied me access"),
    (fm.error(404, "The API deployment for this resource does not exist.", code="DeploymentNotFound"),
     "not_found", "AZURE_OPENAI_DEPLOYMENT"),
    (fm.error(400, "This model's maximum context length is 128000 tokens.", code="context_length_exceeded"),
     "context_length", "too long for the model"),
    (fm.error(429, "You exceeded your current quota.", code="insufficient_quota"), "quota", "quota is used up"),
    (fm.error(400, "Invalid value for 'tool_choice'.", code="invalid_value"), "bad_request", "rejected the request"),
    (fm.raw(502, b"<html>Bad Gateway</html>", content_type="text/html"), "server_error", "HTTP 502"),
])
async def test_each_failure_gets_its_own_message(clients: Clients, fake: FakeOpenAI, reply: fm.Reply, cause: str,
                                                 phrase: str) -> None:
    fake.enqueue(reply)
    error = await failure(clients(azure_settings(fake)))
    assert (error.cause, error.user_message.startswith("Sorry")) == (cause, True), str(error)
    assert phrase in error.user_message, error.user_message


async def test_an_unreachable_server_is_reported_with_the_setting_to_check(clients: Clients) -> None:
    settings = Settings(openai_base_url=f"http://127.0.0.1:{free_port()}/v1", openai_model="m",
                        model_max_retries=0)
    error = await failure(clients(settings))
    assert error.cause == "unreachable" and "couldn't reach the model service" in error.user_message
    assert "OPENAI_BASE_URL" in str(error)


async def test_an_unexpected_failure_keeps_the_generic_message() -> None:
    class Broken(OfflineChatCompletionClient):
        async def create(self, *args: Any, **kwargs: Any) -> Any:
            raise KeyError("surprise")

    error = await failure(Broken())
    assert error.cause == "unknown"
    assert error.user_message == ("Sorry, I couldn't get an answer from the model just now. Nothing was lost: "
                                  "please try again in a moment.")
    assert "surprise" in str(error)


# --- the processor keeps the state ------------------------------------------------------------


class Sender:
    def __init__(self) -> None:
        self.texts: list[str] = []

    async def send(self, reference: JSON, activity: JSON) -> str | None:
        self.texts.append(activity["text"])
        return str(len(self.texts))

    async def typing(self, reference: JSON) -> None:
        return None


async def test_a_failed_turn_leaves_the_state_alone_and_the_next_message_works(clients: Clients,
                                                                               fake: FakeOpenAI) -> None:
    store, sender = MemoryStore(), Sender()
    runner = make_runner(clients(openai_settings(fake)), store)
    processor = ConversationProcessor(store, runner, sender, welcome=lambda: text_activity("welcome"))
    await store.save_reference(KEY, REFERENCE)

    async def say(event_id: str, text: str) -> None:
        await store.append_event(KEY, InboxEvent(id=event_id, kind="message", payload={"text": text}))
        processor.wake(KEY)
        await processor.idle()

    await say("m1", "my name is Ada")
    before = (await store.load(KEY)).agent_state
    # The model asks for a job, then fails while writing its answer: no job, no half turn.
    fake.enqueue(fm.tool_calls(fm.tool_call("activate_new_line", {"phone_number": "555-0100"})),
                 fm.error(500, "boom"))
    await say("m2", "activate 555-0100")
    assert "internal error (HTTP 500)" in sender.texts[-1]
    after = await store.load(KEY)
    assert after.agent_state == before
    assert await store.list_jobs(KEY) == [] and await store.pending_events(KEY) == []

    await say("m3", "still there?")
    assert sender.texts[-1] == "echo: still there?"
    state = (await store.load(KEY)).agent_state
    assert state is not None
    contents = [m["content"] for m in state["agent_states"]["assistant"]["agent_state"]["llm_context"]["messages"]]
    assert "my name is Ada" in contents and "still there?" in contents and "activate 555-0100" not in contents


# --- settings ---------------------------------------------------------------------------------


def test_system_prompt_from_the_environment_or_a_file(tmp_path: Path) -> None:
    assert Settings.from_env({}, dotenv=None).agent_system_prompt == ""
    assert Settings.from_env({"AGENT_SYSTEM_PROMPT": " Be a pirate. "}, dotenv=None).agent_system_prompt == (
        "Be a pirate.")
    prompt = tmp_path / "prompt.md"
    prompt.write_text("You help Contoso's field engineers.\n\nJobs run in the background.\n", encoding="utf-8")
    settings = Settings.from_env({"AGENT_SYSTEM_PROMPT_FILE": str(prompt)}, dotenv=None)
    assert settings.agent_system_prompt == "You help Contoso's field engineers.\n\nJobs run in the background."
    assert settings.agent_system_prompt_file == str(prompt)


@pytest.mark.parametrize(("env", "message"), [
    ({"AGENT_SYSTEM_PROMPT": "a", "AGENT_SYSTEM_PROMPT_FILE": "b"}, "not both"),
    ({"AGENT_SYSTEM_PROMPT_FILE": "/nonexistent/prompt.txt"}, "AGENT_SYSTEM_PROMPT_FILE: cannot read"),
    ({"OPENAI_TIMEOUT_SECONDS": "0"}, "OPENAI_TIMEOUT_SECONDS must be more than 0"),
    ({"OPENAI_TIMEOUT_SECONDS": "soon"}, "OPENAI_TIMEOUT_SECONDS must be a number"),
    ({"OPENAI_MAX_RETRIES": "-1"}, "OPENAI_MAX_RETRIES must be 0 or more"),
    ({"AZURE_OPENAI_ENDPOINT": "https://x.openai.azure.com"}, "AZURE_OPENAI_DEPLOYMENT"),
])
def test_bad_model_settings_are_refused_at_start_up(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env, dotenv=None)


def test_model_timeout_and_retries_from_the_environment() -> None:
    settings = Settings.from_env({"OPENAI_TIMEOUT_SECONDS": "7.5", "OPENAI_MAX_RETRIES": "0"}, dotenv=None)
    assert (settings.model_timeout_seconds, settings.model_max_retries) == (7.5, 0)
    assert (Settings().model_timeout_seconds, Settings().model_max_retries) == (60.0, 2)


async def test_a_custom_system_prompt_reaches_the_model(clients: Clients, fake: FakeOpenAI) -> None:
    runner = make_runner(clients(openai_settings(fake)), system_message="You are Contoso's helper.")
    await runner.run(KEY, None, [AgentInput("hi")])
    assert fake.requests()[0].system_prompt == "You are Contoso's helper."


def test_the_default_system_prompt_explains_background_jobs() -> None:
    for words in ("background job", "job id", "background_job", "call_id", "do not wait", "failed",
                  "get_job_status"):
        assert words in DEFAULT_SYSTEM_MESSAGE, words
