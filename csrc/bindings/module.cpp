// Python module init for masked_dit._C. The ops themselves are registered by static
// initialisers (TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL in the other binding files) when
// the shared library loads; importing the module is all Python needs to do. No pybind11, so
// the module has no dependency on the Python C++ API beyond module creation.
#include <Python.h>

// The TORCH_CUDA_ARCH_LIST the kernels were built for (setup.py passes it with ',' for ';'),
// exposed as _C.cuda_archs so Python can fall back instead of failing with "no kernel image"
// on a GPU the build does not cover. Empty when unknown (e.g. a build without setup.py).
#define MASKED_DIT_STRINGIFY(...) #__VA_ARGS__
#define MASKED_DIT_EXPAND_STRINGIFY(...) MASKED_DIT_STRINGIFY(__VA_ARGS__)
#ifdef MASKED_DIT_CUDA_ARCHS
#define MASKED_DIT_CUDA_ARCHS_STR MASKED_DIT_EXPAND_STRINGIFY(MASKED_DIT_CUDA_ARCHS)
#else
#define MASKED_DIT_CUDA_ARCHS_STR ""
#endif

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",   // name
      "masked-dit CUDA kernels; ops live under torch.ops.masked_dit_C",
      -1,     // no per-module state
      nullptr,
  };
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && PyModule_AddStringConstant(module, "cuda_archs", MASKED_DIT_CUDA_ARCHS_STR) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
