"""What every kernel module needs to know about how Triton runs here."""
import os

import triton.language as tl


def stdlib_interpreted() -> bool:
    """Whether Triton's own jit helpers (tl.zeros, tl.sum, ...) were built for the interpreter.

    Triton decides interpret mode when a function is decorated: for its standard library that is
    when triton is first imported, for our kernels when their module is. Both must agree.
    """
    return type(tl.zeros).__name__ == "InterpretedFunction"


# Kernels run in the interpreter (on CPU tensors) only if TRITON_INTERPRET=1 was set before triton
# was first imported; set later, it would give half-interpreted, unusable kernels.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1" and stdlib_interpreted()
