"""Shared test helpers (importable as `helpers`: tests/ is on sys.path through tests/conftest.py).

One module per concern: `helpers.images` (image folders and split files on disk), `helpers.adapters`
(randomised adapters and model weights), `helpers.runs` (``python -m sage_fast`` runs as subprocesses, and
reading their folders back).
"""
