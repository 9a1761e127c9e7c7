"""The package's version, in a module that imports nothing: what records it (bundles, reports, the server,
the CLI) reads it here instead of from ``medclf/__init__.py``, which reaches the public API."""

__version__ = "0.1.0"
