"""The kubetune trainer: runs inside the pod the operator creates. Imports torch; the operator never imports this."""

import logging as _logging
import os as _os

# Before torch starts CUDA: the caching allocator's fixed-size segments fragment as a training step's
# tensor sizes vary (0.5 GiB and more reserved but unusable, shared/calibration's 8B rows); growable
# segments keep reserved memory close to allocated. A value in the pod's env (resources.env) stands.
_os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

# bitsandbytes (imported by peft and transformers in every run) looks for an optional CPU kernel on
# hosts with AVX512-BF16, as most GPU nodes' Xeons are, and warns at import when it is not installed.
# The trainer never wants it fetched, so the line is noise in every pod's log.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda r: "kernels-community" not in r.getMessage())
