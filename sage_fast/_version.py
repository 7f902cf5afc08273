"""The package's version, in one place: `sage_fast.__version__` and the packaging metadata
(pyproject.toml, ``[tool.setuptools.dynamic]``) both read it."""
__version__ = "0.1.0"
