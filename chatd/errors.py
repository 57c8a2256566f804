"""One exception hierarchy for chatd, and the process exit codes.

::

    ChatdError
    ├── ConfigError            a configuration file or flag is invalid (all problems at once)
    ├── ProtocolError          a client frame is invalid; carries the protocol error code
    ├── StoreError             the session store failed (I/O, corruption, lost connection)
    ├── ControlError           the control channel failed (framing, oversize, peer gone)
    └── UpstreamError          an LLM backend failed; carries the protocol error code
        ├── UpstreamTimeout        no first token / a gap between tokens / total deadline
        ├── UpstreamUnavailable    connection refused, 5xx, no healthy backend
        └── UpstreamRejected       4xx or an error inside the stream (unknown model, ...)

Clients never see exception text: the session maps these to ``error`` frames with a
code and one sentence (see ``chatd.proto.chat``); an unexpected exception becomes
``internal`` with a log reference.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Exit statuses of chatd's commands (never ``status >> 8``: see the master's reaper)."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    WORKER_BOOT_ERROR = 3
    NOT_RUNNING = 3  # chatctl status: LSB "program is not running"
    CONFIG = 78  # sysexits.h EX_CONFIG (os.EX_CONFIG; errors stays importable by pure code)


class ChatdError(Exception):
    """Root of every error chatd raises on purpose."""


class ConfigError(ChatdError):
    """A configuration is invalid.

    Attributes:
        problems: every problem found, each a line ``PATH: section.key: what is wrong``.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class ProtocolError(ChatdError):
    """A client frame violates the chat protocol.

    Attributes:
        code: the protocol error code (``bad_request``, ``too_large``, ...).
        message: one sentence for the client.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class StoreError(ChatdError):
    """The session store could not do what was asked."""


class SessionGone(StoreError):
    """The session is unknown or has expired: the store answered, it did not fail."""


class ControlError(ChatdError):
    """The control channel broke: bad framing, an oversized frame, or the peer left."""


class UpstreamError(ChatdError):
    """An LLM backend failed.

    Attributes:
        code: the protocol error code sent to the client.
        retryable: whether the client may retry the same message later.
        backend: the URL of the backend that failed ("" when none was tried).
        message: one sentence naming the backend, what happened and what to do.
        first_token_sent: whether reply text had already reached the caller; a retry is only
            allowed when it had not.
        status: the backend's HTTP status when it answered with an error, else None.
        detail: the backend's own error text (from its body or an error in the stream), or "":
            the Ollama/OpenAI APIs pass it on as the backend said it.
    """

    code = "llm_error"
    retryable = False

    def __init__(
        self, message: str, *, backend: str = "", status: int | None = None, detail: str = ""
    ) -> None:
        super().__init__(message)
        self.message = message
        self.backend = backend
        self.first_token_sent = False
        self.status = status
        self.detail = detail


class UpstreamTimeout(UpstreamError):
    """No first token in time, no token for ``idle_timeout``, or the total deadline passed."""

    code = "llm_timeout"
    retryable = True


class UpstreamUnavailable(UpstreamError):
    """The backend cannot be reached or answered 5xx; no healthy backend is left."""

    code = "llm_unavailable"
    retryable = True


class UpstreamRejected(UpstreamError):
    """The backend answered 4xx or sent an error inside the stream."""

    code = "llm_error"
    retryable = False
