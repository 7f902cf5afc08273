"""How Triton runs here: the one interpret-mode flag of sage-fast.

`INTERPRET` is the single source of truth: the kernel modules import this module before they
decorate their kernels, and the ops layer reads it through `sage_fast.ops.backend.interpret_enabled`
(the dependency goes ops -> kernels, never back; this module imports nothing of sage_fast).
"""
import os

import triton.language as tl


def stdlib_interpreted() -> bool:
    """Whether Triton's own jit helpers (tl.zeros, tl.sum, ...) were built for the interpreter.

    Triton decides interpret mode when a function is decorated: for its standard library that is
    when triton is first imported, for our kernels when their module is. Both must agree.
    """
    return type(tl.zeros).__name__ == "InterpretedFunction"


#: True when the kernels run in Triton's interpreter (on CPU tensors). Decided once, when this module
#: is first imported (by a kernel module, or by the ops layer asking): only if TRITON_INTERPRET=1 was
#: set before triton was first imported; set later, it would give half-interpreted, unusable kernels.
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1" and stdlib_interpreted()
