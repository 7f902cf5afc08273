"""sage-fast benchmarks (pytest-benchmark) and the launch-configuration tuner. See benchmarks/README.md.

A package so that the benchmark modules import their shared modules (``benchmarks.timing``,
``benchmarks.records``, ...) without clashing with module names under tests/, and so that
``python -m benchmarks.report`` and ``python -m benchmarks.tuning`` run from the repository root.
"""
