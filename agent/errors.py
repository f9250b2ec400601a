"""The agent's error tree.

    AgentError          root; carries the QMP error class and the description
                        exactly as qemu-ga puts them on the wire

Handlers raise ``AgentError("desc")`` (class GenericError) or pass another
class; only the dispatcher turns them into ``{"error": {"class", "desc"}}``.
"""

from __future__ import annotations


class AgentError(Exception):
    """An error answered to the host as ``{"class": error_class, "desc": desc}``."""

    def __init__(self, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class
