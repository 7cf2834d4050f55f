"""Shared setup for the op tests.

TRITON_INTERPRET must be set before triton is first imported, so the triton backend's
kernels run on CPU tensors here (slowly: keep interpreter shapes small).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
