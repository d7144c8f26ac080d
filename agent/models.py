"""Chooses the model client from the settings: Azure OpenAI, OpenAI(-compatible), or offline.

- **Azure OpenAI** when ``AZURE_OPENAI_ENDPOINT`` is set: requests go to
  ``{endpoint}/openai/deployments/{AZURE_OPENAI_DEPLOYMENT}/chat/completions?api-version=...``
  with the ``api-key`` header (``AZURE_OPENAI_API_KEY``), or without a key an Entra ID bearer
  token from ``DefaultAzureCredential`` (managed identity, ``az login``, environment ...).
- **OpenAI or an OpenAI-compatible server** (Ollama, vLLM, llama.cpp, LiteLLM ...) when
  ``OPENAI_API_KEY`` or ``OPENAI_BASE_URL`` is set: ``Authorization: Bearer <key>``.
- Otherwise the **offline model** (agent/offline_model.py).

Both real clients get a request timeout (``OPENAI_TIMEOUT_SECONDS``) and a retry budget
(``OPENAI_MAX_RETRIES``): the openai SDK retries timeouts, connection errors, 408/409/429 and
5xx with exponential backoff and honours ``Retry-After`` (up to two minutes). What still fails
reaches the turn runner, which turns it into a short message for the user (agent/runner.py).

:class:`ModelCallRecorder` wraps the client for each turn. It keeps the exception a model call
raised (AutoGen's group chat reports an agent's failure as a ``RuntimeError`` that carries only
the text, and the runner needs the real exception to tell a timeout from a rate limit), turns an
answer the content filter withheld into :class:`ContentFilteredError` (autogen-ext would pass it
on as an empty reply), and sends earlier malformed tool-call arguments as valid JSON.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from autogen_core import CancellationToken, FunctionCall
from autogen_core.models import (
    AssistantMessage,
    ChatCompletionClient,
    CreateResult,
    LLMMessage,
    ModelCapabilities,
    ModelFamily,
    ModelInfo,
    RequestUsage,
)
from autogen_core.tools import Tool, ToolSchema
from pydantic import BaseModel

from agent.offline_model import OfflineChatCompletionClient
from runtime.config import Settings

if TYPE_CHECKING:  # imported when used: the offline model needs neither openai nor autogen-ext's clients
    from autogen_ext.models.openai import AzureOpenAIChatCompletionClient, OpenAIChatCompletionClient

DEFAULT_OPENAI_MODEL = "gpt-4o-mini"
ENTRA_ID_SCOPE = "https://cognitiveservices.azure.com/.default"


@dataclass(frozen=True)
class ModelProvider:
    """Which service a client talks to, and the settings an operator checks when it fails."""

    name: str  # "OpenAI", "Azure OpenAI", "offline"
    credentials: str  # what to check when the service refuses the credentials
    endpoint: str  # what to check when the service cannot be reached
    model: str  # what to check when the service does not know the model / deployment


OFFLINE = ModelProvider("offline", "the model settings", "the model settings", "the model settings")
UNKNOWN = ModelProvider("model", "the model credentials", "the model endpoint", "the model name")


class ContentFilteredError(Exception):
    """The service withheld the model's answer (``finish_reason`` ``content_filter``)."""


def _checked(result: CreateResult) -> CreateResult:
    # autogen-ext passes a filtered answer on as an empty text; the user would get no reply at all.
    if result.finish_reason == "content_filter":
        raise ContentFilteredError("the model's answer was withheld by the content filter (finish_reason "
                                   f"content_filter; partial content: {str(result.content)[:200]!r})")
    return result


def _json_object_arguments(messages: Sequence[LLMMessage]) -> Sequence[LLMMessage]:
    """Earlier tool calls with arguments that are not a JSON object, made sendable.

    A model can emit malformed arguments (the tool then answers with an error, which the model
    sees). They stay in the conversation's history, and servers that parse the history's tool calls
    (vLLM, llama.cpp ...) would refuse every later request. Sent instead: the raw text, wrapped in
    a JSON object; what is stored is unchanged.
    """
    if not any(isinstance(m, AssistantMessage) and isinstance(m.content, list) for m in messages):
        return messages
    fixed: list[LLMMessage] = []
    for message in messages:
        if isinstance(message, AssistantMessage) and isinstance(message.content, list):
            calls = [call if _is_json_object(call.arguments) else FunctionCall(
                id=call.id, name=call.name, arguments=json.dumps({"unparsed_arguments": call.arguments}))
                for call in message.content]
            if calls != message.content:
                message = message.model_copy(update={"content": calls})
        fixed.append(message)
    return fixed


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (TypeError, ValueError):
        return False


#: The model client of the configured provider, as the composition root holds (and closes) it: an
#: AutoGen client, named here so that AutoGen is imported inside agent/ only.
ModelClient = ChatCompletionClient


def create_model_client(settings: Settings, *, azure_credential: Any = None,
                        offline_run_phrase: bool = False) -> ModelClient:
    """The client for the configured provider. ``azure_credential`` (an ``azure.core`` async token
    credential) replaces ``DefaultAzureCredential`` for Entra ID auth (tests, custom identities);
    ``offline_run_phrase`` lets the offline model's ``run <tool> {json}`` call tools (local mode)."""
    if settings.azure_openai_endpoint:
        return _azure_client(settings, azure_credential)
    if settings.openai_api_key or settings.openai_base_url:
        return _openai_client(settings)
    return OfflineChatCompletionClient(run_phrase=offline_run_phrase)


def _azure_client(settings: Settings, credential: Any) -> AzureOpenAIChatCompletionClient:
    from autogen_ext.models.openai import AzureOpenAIChatCompletionClient

    if settings.azure_openai_api_key:
        auth: dict[str, Any] = {"api_key": settings.azure_openai_api_key}
        credentials = "AZURE_OPENAI_API_KEY"
    else:
        from azure.identity.aio import DefaultAzureCredential, get_bearer_token_provider

        auth = {"azure_ad_token_provider": get_bearer_token_provider(credential or DefaultAzureCredential(),
                                                                     ENTRA_ID_SCOPE)}
        credentials = ("the bot's Entra ID identity and its role on the Azure OpenAI resource "
                       "(Cognitive Services OpenAI User), or set AZURE_OPENAI_API_KEY")
    client = AzureOpenAIChatCompletionClient(
        azure_endpoint=settings.azure_openai_endpoint,
        azure_deployment=settings.azure_openai_deployment,
        model=settings.openai_model or settings.azure_openai_deployment,
        api_version=settings.azure_openai_api_version,
        model_info=_model_info(),
        timeout=settings.model_timeout_seconds,
        max_retries=settings.model_max_retries,
        **auth,
    )
    _PROVIDERS[client] = ModelProvider("Azure OpenAI", credentials, "AZURE_OPENAI_ENDPOINT",
                                       "AZURE_OPENAI_DEPLOYMENT")
    _no_model_name_check(client)
    return client


def _openai_client(settings: Settings) -> OpenAIChatCompletionClient:
    from autogen_ext.models.openai import OpenAIChatCompletionClient

    kwargs: dict[str, Any] = {
        "model": settings.openai_model or DEFAULT_OPENAI_MODEL,
        # An OpenAI-compatible server often needs no key, but the SDK insists on one.
        "api_key": settings.openai_api_key or "not-needed",
        "timeout": settings.model_timeout_seconds,
        "max_retries": settings.model_max_retries,
    }
    if settings.openai_base_url:
        kwargs["base_url"] = settings.openai_base_url
        kwargs["model_info"] = _model_info()
    try:
        client = OpenAIChatCompletionClient(**kwargs)
    except ValueError:  # a model name autogen-ext knows no capabilities for (a newer model)
        client = OpenAIChatCompletionClient(**kwargs, model_info=_model_info())
    if settings.openai_base_url:
        provider = ModelProvider("OpenAI-compatible server", "OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_MODEL")
    else:
        provider = ModelProvider("OpenAI", "OPENAI_API_KEY", "the network path to api.openai.com", "OPENAI_MODEL")
    _PROVIDERS[client] = provider
    _no_model_name_check(client)
    return client


def _no_model_name_check(client: OpenAIChatCompletionClient | AzureOpenAIChatCompletionClient) -> None:
    # autogen-ext warns on every answer whose `model` differs from its guess of the resolved name
    # (always so for an Azure deployment name or a server's own naming): noise, not news.
    client._resolved_model = None


def _model_info() -> ModelInfo:
    # Unknown deployments/servers: assume tool calling, the one capability the bot needs.
    return {"vision": False, "function_calling": True, "json_output": True, "family": ModelFamily.UNKNOWN,
            "structured_output": False}


_PROVIDERS: weakref.WeakKeyDictionary[ChatCompletionClient, ModelProvider] = weakref.WeakKeyDictionary()


def provider_of(client: ChatCompletionClient) -> ModelProvider:
    """The provider :func:`create_model_client` made ``client`` for (error messages name its settings)."""
    if isinstance(client, ModelCallRecorder):
        client = client.inner
    if isinstance(client, OfflineChatCompletionClient):
        return OFFLINE
    return _PROVIDERS.get(client, UNKNOWN)


class ModelCallRecorder(ChatCompletionClient):
    """Wraps a client for one turn: keeps the last exception a model call raised (see the module
    doc) and turns an answer the content filter withheld into :class:`ContentFilteredError`."""

    def __init__(self, inner: ChatCompletionClient) -> None:
        self.inner = inner
        self.error: Exception | None = None
        #: What the model service reported using over this turn's calls (agent/budget.py counts it).
        self.usage = RequestUsage(prompt_tokens=0, completion_tokens=0)

    def _add_usage(self, result: CreateResult) -> CreateResult:
        used = result.usage
        self.usage = RequestUsage(prompt_tokens=self.usage.prompt_tokens + max(0, used.prompt_tokens or 0),
                                  completion_tokens=self.usage.completion_tokens + max(0, used.completion_tokens or 0))
        return result

    async def create(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = [],
        tool_choice: Tool | Literal["auto", "required", "none"] = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
    ) -> CreateResult:
        try:
            return _checked(self._add_usage(await self.inner.create(
                _json_object_arguments(messages), tools=tools, tool_choice=tool_choice, json_output=json_output,
                extra_create_args=extra_create_args, cancellation_token=cancellation_token)))
        except Exception as exc:
            self.error = exc
            raise

    async def create_stream(
        self,
        messages: Sequence[LLMMessage],
        *,
        tools: Sequence[Tool | ToolSchema] = [],
        tool_choice: Tool | Literal["auto", "required", "none"] = "auto",
        json_output: bool | type[BaseModel] | None = None,
        extra_create_args: Mapping[str, Any] = {},
        cancellation_token: CancellationToken | None = None,
    ) -> AsyncGenerator[str | CreateResult, None]:
        # A streamed answer reports its usage (the budgets count it) only when asked to.
        extra_create_args = {"stream_options": {"include_usage": True}, **extra_create_args}
        try:
            async for item in self.inner.create_stream(
                    _json_object_arguments(messages), tools=tools, tool_choice=tool_choice, json_output=json_output,
                    extra_create_args=extra_create_args, cancellation_token=cancellation_token):
                if isinstance(item, CreateResult):
                    item = _checked(self._add_usage(item))
                yield item
        except Exception as exc:
            self.error = exc
            raise

    async def close(self) -> None:
        return None  # the wrapped client outlives the turn: its owner closes it

    def actual_usage(self) -> RequestUsage:
        return self.inner.actual_usage()

    def total_usage(self) -> RequestUsage:
        return self.inner.total_usage()

    def count_tokens(self, messages: Sequence[LLMMessage], *, tools: Sequence[Tool | ToolSchema] = []) -> int:
        return self.inner.count_tokens(messages, tools=tools)

    def remaining_tokens(self, messages: Sequence[LLMMessage], *, tools: Sequence[Tool | ToolSchema] = []) -> int:
        return self.inner.remaining_tokens(messages, tools=tools)

    @property
    def capabilities(self) -> ModelCapabilities:  # deprecated upstream, still abstract
        return self.inner.capabilities

    @property
    def model_info(self) -> ModelInfo:
        return self.inner.model_info
