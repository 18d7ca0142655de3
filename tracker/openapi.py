"""The OpenAPI 3.1 description served at ``/openapi.json``.

Built from the definitions the handlers validate with: name patterns, hex patterns and bounds
are imported from :mod:`tracker.core`, :mod:`tracker.outcomes`, :mod:`tracker.channels` and the
manifest's name rule, so a limit changed in the code changes here too. docs/tracker-api.md
stays the normative text; tests/tracker/test_openapi.py checks that every route appears, that
every path parameter is declared and that declared status codes are the ones the server returns.
The schemas are in :mod:`tracker.openapi_components`, the routes' operations in
:mod:`tracker.openapi_paths`, both built from :mod:`tracker.openapi_parts`.
"""

from __future__ import annotations

from typing import Any

from .openapi_components import _schemas
from .openapi_paths import _paths

__all__ = ["openapi_document"]


def openapi_document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "p2pnode tracker",
            "version": "1",
            "description": "Release channels, update feed, signed announces and peer-quality "
            "reports. Normative text: docs/tracker-api.md.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": _schemas(),
        },
        "paths": _paths(),
    }
