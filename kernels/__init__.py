"""Triton kernels of sage-fast, installed as `sage_fast.kernels`.

Kernels only: the autograd glue and the modules live in `sage_fast`. Importing this package
needs Triton; on a machine without a GPU the kernels run under `TRITON_INTERPRET=1`, which must
be set before triton is first imported (Triton decides at decoration time).
"""
