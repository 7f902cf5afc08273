"""Helpers every layer uses and that know nothing of Sage: atomic files. Imports nothing of `sage_fast`."""
