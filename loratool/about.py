"""The package's version, importable from every layer (``loratool.__version__`` too)."""

__version__ = "0.1.0"
