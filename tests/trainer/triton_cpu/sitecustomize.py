"""Two gaps of Triton's CPU interpreter (TRITON_INTERPRET=1) that Liger's kernels run into, filled so
the CPU tests run Liger's own kernel code unchanged. Put this folder on PYTHONPATH of a trainer process.

- A Python float kernel argument stays a float in the interpreter, where compiled Triton passes an fp32
  scalar; Liger calls ``eps.to(tl.float32)`` on one.
- ``libdevice`` functions imported by name (``from triton.language.extra.libdevice import rsqrt``) are
  compiler stubs the interpreter never swaps for its numpy versions (it patches ``tl.math`` at launch):
  each is replaced by a call to ``tl.math``'s function of the same name, looked up when it runs, and
  ``tanh`` (Liger's GeGLU), which ``tl.math`` lacks, by 2·sigmoid(2x) − 1 (equal to fp32 rounding).
"""
import os

if os.environ.get("TRITON_INTERPRET") == "1":
    import numpy as np
    import triton.language as tl
    from triton.language.extra import libdevice
    from triton.runtime import interpreter

    _cvt = interpreter._implicit_cvt

    def _implicit_cvt(arg):
        if isinstance(arg, float):
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return _cvt(arg)

    interpreter._implicit_cvt = _implicit_cvt

    def _late(name):
        return lambda *a, **k: getattr(tl.math, name)(*a, **k)

    for _name in dir(libdevice):
        if not _name.startswith("_") and hasattr(tl.math, _name):
            setattr(libdevice, _name, _late(_name))
    libdevice.tanh = lambda x: 2 * tl.sigmoid(2 * x) - 1
