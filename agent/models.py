"""Chooses the model client from the settings: Azure OpenAI, OpenAI(-compatible), or offline."""

from __future__ import annotations

from autogen_core.models import ChatCompletionClient, ModelFamily, ModelInfo

from agent.offline_model import OfflineChatCompletionClient
from config import Settings


def create_model_client(settings: Settings) -> ChatCompletionClient:
    if settings.azure_openai_endpoint:
        from autogen_ext.models.openai import AzureOpenAIChatCompletionClient

        if settings.azure_openai_api_key:
            auth: dict[str, object] = {"api_key": settings.azure_openai_api_key}
        else:
            from azure.identity.aio import DefaultAzureCredential, get_bearer_token_provider

            auth = {"azure_ad_token_provider": get_bearer_token_provider(
                DefaultAzureCredential(), "https://cognitiveservices.azure.com/.default")}
        return AzureOpenAIChatCompletionClient(
            azure_endpoint=settings.azure_openai_endpoint,
            azure_deployment=settings.azure_openai_deployment,
            model=settings.openai_model or settings.azure_openai_deployment,
            api_version=settings.azure_openai_api_version,
            model_info=_model_info(),
            **auth,  # type: ignore[arg-type]
        )
    if settings.openai_api_key or settings.openai_base_url:
        from autogen_ext.models.openai import OpenAIChatCompletionClient

        kwargs: dict[str, object] = {"model": settings.openai_model or "gpt-4o-mini",
                                     "api_key": settings.openai_api_key or "not-needed"}
        if settings.openai_base_url:
            kwargs["base_url"] = settings.openai_base_url
            kwargs["model_info"] = _model_info()
        return OpenAIChatCompletionClient(**kwargs)  # type: ignore[arg-type]
    return OfflineChatCompletionClient()


def _model_info() -> ModelInfo:
    # Unknown deployments/servers: assume tool calling, the one capability the bot needs.
    return {"vision": False, "function_calling": True, "json_output": True, "family": ModelFamily.UNKNOWN,
            "structured_output": False}
