"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP status."""

from __future__ import annotations

from dataclasses import dataclass

# OpenAI's error types, by status
TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
         405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
         415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


@dataclass
class ApiError(Exception):
    """A request the server answers with an error. `message` goes to the client: it names the field,
    the value and the fix, and never a path or an environment value of this machine."""

    status: int
    message: str
    param: str | None = None
    code: str | None = None

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}
