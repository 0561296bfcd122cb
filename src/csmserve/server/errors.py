"""csmserve's own error shape on HTTP, ``{"error": {"code", "message"}}``: the renderer of the routes
that are no other API's (voices, the demo page, /generate) and of anything a route did not catch.
Status and headers (``Retry-After``) come from the error type."""

from __future__ import annotations

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from csmserve.errors import CsmServeError


def error_response(exc: CsmServeError, status: int | None = None) -> JSONResponse:
    """``exc`` as csmserve's JSON error; ``status`` overrides the error's own (a 400 for a body that is not JSON)."""
    return JSONResponse({"error": exc.to_dict()}, status_code=status or exc.http_status, headers=exc.headers() or None)


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    """FastAPI's own validation (form fields, path parameters) as a 422 in csmserve's shape."""
    messages = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        messages.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return JSONResponse(
        {"error": {"code": "invalid_request", "message": "; ".join(messages) or "invalid request"}},
        status_code=422,
    )
