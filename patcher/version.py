"""The package version (one place; pyproject.toml reads it)."""
__version__ = "0.1.0"

#: The name every JSON file the verbs write (``--json``, ``--report``) carries as ``tool``.
TOOL = "onnx-rectify"
#: The layout version of those JSON files (``schema_version``): raised when a field is
#: renamed, removed or changes meaning; new fields keep it.
JSON_SCHEMA_VERSION = 1


def json_header() -> dict:
    """``tool``, ``version`` and ``schema_version``: the first keys of every JSON file the
    verbs write, so that a reader can tell what wrote it and which layout to expect."""
    return {"tool": TOOL, "version": __version__, "schema_version": JSON_SCHEMA_VERSION}
