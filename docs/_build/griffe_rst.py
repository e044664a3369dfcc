"""A griffe extension for the docs build: the docstrings use a few reST roles; render them as code.

``:class:`~dcp_plugin.x.Y``` becomes ``Y`` in code font, ``:meth:`title <target>``` becomes ``title``, so the API
reference reads well without rewriting every docstring.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension

ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj|py:\w+):`(?P<tilde>~?)(?P<text>[^`]+)`")


def _code(match: re.Match[str]) -> str:
    text = match["text"]
    if "<" in text:  # `title <target>`: show the title
        text = text.split("<", 1)[0].strip()
    elif match["tilde"]:  # `~a.b.C`: show the last part
        text = text.rsplit(".", 1)[-1]
    return f"`{text}`"


def convert(text: str) -> str:
    """The docstring with every reST role as a plain code span."""
    return ROLE.sub(_code, text)


class ReSTRoles(Extension):
    """Rewrites every docstring griffe loads (modules, classes, functions, attributes)."""

    def on_instance(self, *, obj: Any, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
