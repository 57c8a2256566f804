"""chatd: a chatbot gateway daemon (docs/architecture.md maps the packages).

``__version__`` is read from the installed distribution's metadata, so the version lives in one
place, ``pyproject.toml``; ``--version`` on every command and ``chatctl status`` show it.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("chatd")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
