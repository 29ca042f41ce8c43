"""The project's own refusals: a setting or file that cannot work, said in one line."""

from __future__ import annotations


class ConfigError(ValueError):
    """A setting or file the run cannot work with, found before training starts. The message is
    one line that names the setting (or file) and says what to change: the ``cppo`` console
    script prints it alone and exits with status 2, as the parser does for its own errors."""
