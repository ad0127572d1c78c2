"""Request limits, bearer-token auth and the OpenAI-style error they raise."""

from __future__ import annotations

import hmac

from .config import Limits
from .schemas import ErrorBody, ErrorDetail


class ApiError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)

    def body(self) -> str:
        return ErrorBody(error=self.detail).model_dump_json()


def check_texts(texts: list[str], limits: Limits, param: str) -> None:
    """Reject too many texts or a text too long, naming the limit (and the index of the text)."""
    if len(texts) > limits.max_inputs_per_request:
        raise ApiError(
            400,
            f"{param} has {len(texts)} items; this server accepts at most {limits.max_inputs_per_request} "
            f"per request (limit max_inputs_per_request)",
            param=param,
            code="too_many_inputs",
        )
    for i, text in enumerate(texts):
        check_text(text, limits, f"{param}[{i}]")


def check_text(text: str, limits: Limits, param: str) -> None:
    """Reject a text longer than ``max_chars_per_input``, or one that is not valid Unicode (a lone
    surrogate such as ``"\\ud800"`` passes the JSON parser but no tokenizer), naming it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ApiError(
            400,
            f"{param} is not valid Unicode text: a lone surrogate U+{ord(text[exc.start]):04X} at character {exc.start}",
            param=param,
            code="invalid_text",
        ) from None
    if len(text) > limits.max_chars_per_input:
        raise ApiError(
            400,
            f"{param} has {len(text)} characters; this server accepts at most {limits.max_chars_per_input} "
            f"characters per input (limit max_chars_per_input)",
            param=param,
            code="input_too_long",
        )


def check_bearer(authorization: str | None, api_key: str | None) -> None:
    """Pass when auth is off (``api_key`` None) or the header is ``Bearer <api_key>``."""
    if api_key is None:
        return
    if not authorization:
        raise ApiError(
            401,
            "missing bearer token: send the header 'Authorization: Bearer <key>'",
            type="authentication_error",
            code="missing_api_key",
        )
    scheme, _, token = authorization.partition(" ")
    # Constant-time comparison: the token is a secret.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "invalid bearer token", type="authentication_error", code="invalid_api_key")
