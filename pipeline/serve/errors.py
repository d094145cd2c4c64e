"""The one error type of the server: an HTTP status, a readable message, and the OpenAI-style error fields."""

from __future__ import annotations


class ApiError(Exception):
    """A request the server refuses; becomes `{"error": {"message", "type", "code", "param"}}` with `status`."""

    def __init__(self, status: int, message: str, code: str = "invalid_request", param: str | None = None,
                 reason: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.reason = reason  # for an image: the same reason `embindex run` records in images_errors

    def body(self) -> dict[str, object]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        error: dict[str, object] = {"message": self.message, "type": kind, "code": self.code, "param": self.param}
        if self.reason is not None:
            error["reason"] = self.reason
        return {"error": error}
