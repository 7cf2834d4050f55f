// Python module init for masked_dit._C. The ops themselves are registered by static
// initialisers (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL in the other binding files) when
// the shared library loads; importing the module is all Python needs to do. No pybind11, so
// the module has no dependency on the Python C++ API beyond module creation.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",   // name
      "masked-dit CUDA kernels; ops live under torch.ops.masked_dit_C",
      -1,     // no per-module state
      nullptr,
  };
  return PyModule_Create(&module_def);
}
}
