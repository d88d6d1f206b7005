"""One error envelope for every error: ``{"error": {"type", "message", "errors"?}}``.

Our own refusals (``ApiError``, ``UploadError``, the library's ``InputError``), FastAPI's request
validation, Starlette's HTTP errors (unknown route, wrong method) and unexpected failures all
answer it, and every route documents it in OpenAPI. No error body carries a server path.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from compress.errors import InputError
from compress.recipe import MAX_REPORTED_ERRORS

from ..redact import redact_error
from ..schemas import ErrorResponse
from ..uploads import UploadError

log = logging.getLogger("compress.service")

DESCRIPTIONS = {
    400: "Malformed request body",
    401: "Missing or invalid bearer token",
    404: "No such job, recipe or artifact for this tenant",
    409: "The job is in a state that does not allow this",
    413: "Upload or field over its size limit",
    415: "Body is not multipart/form-data",
    422: "Invalid input; `errors` lists each problem with its field",
    500: "Internal error (details in the service log)",
}
# An input with thousands of problems gets a short answer: the first ones say what is wrong.
# Recipe errors arrive capped by the library (MAX_REPORTED_ERRORS plus its "... and N more"
# line) and pass through whole; this bound catches every other list (request validation).
MAX_ERRORS = MAX_REPORTED_ERRORS + 1
MAX_MESSAGE_LINES = 20
MAX_MESSAGE_CHARS = 4000
HTTP_TYPES = {400: "BadRequest", 401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed",
              409: "Conflict", 413: "UploadError", 415: "UnsupportedMediaType",
              422: "ValidationError"}


class ApiError(Exception):
    """A refusal with its HTTP status; answered in the error envelope."""

    def __init__(self, status: int, message: str, type_: str = "Error",
                 errors: list[dict] | None = None, headers: dict | None = None):
        self.status, self.type, self.errors, self.headers = status, type_, errors, headers
        super().__init__(message)


def responses(*codes: int) -> dict[int, dict]:
    """OpenAPI ``responses`` for these error statuses (500 is always added)."""
    return {c: {"model": ErrorResponse, "description": DESCRIPTIONS[c]}
            for c in sorted({*codes, 500})}


def error_response(status: int, type_: str, message: str, errors: list[dict] | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = {"type": type_, "message": _bounded(message)}
    if errors:
        body["errors"] = errors[:MAX_ERRORS]
        if len(errors) > MAX_ERRORS:
            body["errors"].append({"loc": "", "msg": f"... and {len(errors) - MAX_ERRORS} more "
                                                     "problems of the same input"})
    return JSONResponse({"error": redact_error(body)}, status_code=status, headers=headers)


def _bounded(message: str) -> str:
    lines = message.splitlines()
    if len(lines) > MAX_MESSAGE_LINES:
        more = len(lines) - MAX_MESSAGE_LINES
        lines = [*lines[:MAX_MESSAGE_LINES], f"  ... and {more} more lines"]
    text = "\n".join(lines)
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + " ..."


def _loc(loc: tuple | list) -> str:
    # ("query", "offset") -> "offset"; ("body", "set", 0) -> "set.0"
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] in ("query", "path", "body", "header", "cookie"):
        parts = parts[1:]
    return ".".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, e: ApiError):
        return error_response(e.status, e.type, str(e), e.errors, e.headers)

    @app.exception_handler(UploadError)
    async def _upload_error(_request: Request, e: UploadError):
        errors = [{"loc": e.field, "msg": str(e)}] if e.field else None
        return error_response(e.status, "UploadError", str(e), errors)

    @app.exception_handler(InputError)
    async def _input_error(_request: Request, e: InputError):
        body = e.to_dict()
        return error_response(422, body["type"], body["message"], body.get("errors"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, e: RequestValidationError):
        errors = [{"loc": _loc(err.get("loc", ())), "msg": str(err.get("msg", ""))}
                  for err in e.errors()]
        summary = "; ".join(f"{x['loc']}: {x['msg']}" for x in errors[:5])
        return error_response(422, "ValidationError", f"invalid request: {summary}", errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, e: StarletteHTTPException):
        return error_response(e.status_code, HTTP_TYPES.get(e.status_code, "HTTPError"),
                              str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(RecursionError)
    async def _too_deep(_request: Request, _e: RecursionError):
        return error_response(422, "ValidationError", "the request is nested too deeply")

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.error("%s %s failed", request.method, request.url.path, exc_info=e)
        return error_response(500, "InternalError",
                              "internal error; the service log has the details")
