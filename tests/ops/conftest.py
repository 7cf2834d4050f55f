"""The op tests run Triton kernels on CPU tensors: ``tests/conftest.py`` sets TRITON_INTERPRET=1
before anything imports triton (keep interpreter shapes small: it is slow)."""
