"""What the server answers besides a request's own InputError (400): each kind with its status."""

from mlx_gemma4u.errors import Gemma4UError

STOPPING = "The server is shutting down; retry the request after it restarts."


class Busy(Gemma4UError):
    """Too many requests are waiting: the client should retry later (HTTP 429)."""

    status, kind = 429, "rate_limit_error"


class ShuttingDown(Gemma4UError):
    """The server is stopping (HTTP 503)."""

    status, kind = 503, "overloaded_error"


class Fault(Gemma4UError):
    """A fault of ours, not of the request (HTTP 500); its traceback is in the server's log."""

    status, kind = 500, "api_error"


class NotFound(Gemma4UError):
    """What the request names does not exist here (HTTP 404): a stored response, say."""

    status, kind = 404, "invalid_request_error"
