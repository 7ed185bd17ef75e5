"""The BGP error tree. Callers match on these types, never on message text.

::

    BGPError
    ├── ValidationError     bad peer / BGP configuration; names the field (CLI exit 1)
    ├── SpeakerError        the ExaBGP process could not be started or talked to
    └── ConfigRenderError   a session plan that ExaBGP cannot express
"""

from __future__ import annotations


class BGPError(Exception):
    """Root of every error raised by the bgp package."""


class ValidationError(BGPError):
    """Bad input. ``field`` names what was wrong, ``problem`` says why."""

    def __init__(self, field: str, problem: str, resource: str = "") -> None:
        self.field = field
        self.problem = problem
        self.resource = resource
        where = f"{resource}: " if resource else ""
        super().__init__(f"{where}field {field!r}: {problem}")


class SpeakerError(BGPError):
    """The ExaBGP process could not be started, configured or talked to."""


class ConfigRenderError(BGPError):
    """A session plan that cannot be expressed in ExaBGP's configuration."""
