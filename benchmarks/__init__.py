"""sage-fast benchmarks (pytest-benchmark). See benchmarks/README.md.

A package so that the benchmark modules import the shared harness as ``benchmarks.harness``
without clashing with module names under tests/.
"""
