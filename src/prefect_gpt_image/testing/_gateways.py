"""Errors as gateways and Azure OpenAI word them, for the emulator's `gateway` setting.

Measured through a LiteLLM 1.108 proxy: it keeps the upstream's message behind a prefix of
its own, but sets `code` to the HTTP status as a string and `type` to its own
(`throttling_error` for a 429), answers a model it does not host with 400 "Invalid model
name passed in model=...", and a key it cannot check with 400 "No connected db.". Azure
OpenAI answers a refused prompt with `contentFilter` and an `inner_error`, a missing
deployment with `DeploymentNotFound`, and a rate limit or a wrong key with the status as its
code. Pure functions of an answer's status and JSON, so the emulator's modules share them.
"""

from __future__ import annotations

import re
from typing import Any, Final

GATEWAYS: Final = ("litellm", "azure")

_MODEL_IN_MESSAGE = re.compile(r"model `([^`]*)`")
_LITELLM_EXCEPTIONS = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    429: "RateLimitError",
}
_AZURE_NO_DEPLOYMENT = (
    "The API deployment for this resource does not exist. If you created the deployment "
    "within the last 5 minutes, please wait a moment and try again."
)
_AZURE_SAFETY = "Your task failed as a result of our safety system."
_AZURE_WRONG_KEY = (
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide "
    "a valid key for an active subscription and use a correct regional API endpoint for your "
    "resource."
)
_AZURE_RATE_LIMIT = (
    "Requests to the ImageGenerations_Create Operation under Azure OpenAI API version "
    "2025-04-01-preview have exceeded call rate limit of your current OpenAI S0 pricing tier. "
    "Please retry after 1 second. Please go here: https://aka.ms/oai/quotaincrease if you "
    "would like to further increase the default rate limit."
)


def as_gateway(gateway: str, status: int, payload: Any) -> tuple[int, Any]:
    """The status and body `gateway` answers in place of OpenAI's error `payload`; anything
    that is not an error in OpenAI's shape passes unchanged."""
    error = payload.get("error") if isinstance(payload, dict) else None
    if status < 400 or not isinstance(error, dict):
        return status, payload
    if gateway == "litellm":
        return _litellm(status, error)
    if gateway == "azure":
        return _azure(status, error)
    raise ValueError(f"unknown gateway {gateway!r}; use one of {GATEWAYS}")


def _litellm(status: int, error: dict[str, Any]) -> tuple[int, Any]:
    code, message = error.get("code"), str(error.get("message") or "")
    if code == "model_not_found":
        found = _MODEL_IN_MESSAGE.search(message)
        model = found.group(1) if found else ""
        detail = {
            "error": f"/images/generations: Invalid model name passed in model={model}. Call "
            "`/v1/models` to view available models for your key."
        }
        return 400, _litellm_error(400, str(detail), "None")
    if status == 401:
        return 401, _litellm_error(401, f"Authentication Error, {message}", "auth_error")
    if code == "moderation_blocked":
        name = "ContentPolicyViolationError"
        text = f"litellm.{name}: litellm.{name}: OpenAIException - {message}"
        return status, _litellm_error(status, text, "None")
    name = _LITELLM_EXCEPTIONS.get(status, "InternalServerError" if status >= 500 else "APIError")
    kind = "throttling_error" if status == 429 else "None"
    return status, _litellm_error(
        status, f"litellm.{name}: {name}: OpenAIException - {message}", kind
    )


def _litellm_error(status: int, message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": "None", "code": str(status)}}


def _azure(status: int, error: dict[str, Any]) -> tuple[int, Any]:
    code = error.get("code")
    if code == "moderation_blocked":
        inner = {
            "code": "ResponsibleAIPolicyViolation",
            "content_filter_results": {"violence": {"filtered": True, "severity": "medium"}},
        }
        return 400, {
            "error": {"code": "contentFilter", "message": _AZURE_SAFETY, "inner_error": inner}
        }
    if code == "model_not_found":
        return 404, {"error": {"code": "DeploymentNotFound", "message": _AZURE_NO_DEPLOYMENT}}
    if status == 401:
        return 401, {"error": {"code": "401", "message": _AZURE_WRONG_KEY}}
    if code == "rate_limit_exceeded":
        return 429, {"error": {"code": "429", "message": _AZURE_RATE_LIMIT}}
    return status, {"error": error}
