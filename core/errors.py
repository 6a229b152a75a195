"""The one exception family that user mistakes travel in; each edge (CLI, HTTP) converts it once."""


class LoragError(Exception):
    """A problem the user can fix. The message names the file, field or request and says what to do.

    Edges print ``str(error)`` without a traceback: the CLI exits with ``exit_code``, the server answers
    with ``http_status`` and an OpenAI-style error object.
    """

    exit_code = 2
    http_status = 400

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message if hint is None else f"{message}. {hint}")


class NotFound(LoragError):
    """The named thing does not exist for this tenant (also used so tenants cannot probe each other)."""

    http_status = 404


class Conflict(LoragError):
    """The request is well-formed but clashes with stored state (e.g. a different embedder)."""

    http_status = 409
