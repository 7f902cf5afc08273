"""Packaging for sage-fast.

`kernels/` lives at the top level of the repository (so the Triton code is easy to find) but is
installed as `sage_fast.kernels`, never as a top-level `kernels` module.
"""
from setuptools import setup

setup(
    packages=[
        "sage_fast",
        "sage_fast.utils",
        "sage_fast.cli",
        "sage_fast.ops",
        "sage_fast.model",
        "sage_fast.training",
        "sage_fast.training.data",
        "sage_fast.kernels",
    ],
    package_dir={"sage_fast": "sage_fast", "sage_fast.kernels": "kernels"},
    package_data={
        "sage_fast": ["py.typed"],
        "sage_fast.model": ["configs/*.json"],
        "sage_fast.ops": ["tuned_launch.json"],
    },
)
