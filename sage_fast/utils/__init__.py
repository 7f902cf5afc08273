"""Helpers every layer uses and that know nothing of Sage: atomic files (`files`), one writer per folder
(`folder_lock`). Imports nothing of `sage_fast`."""
