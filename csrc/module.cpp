// The Python module flash_attn_ext._C holds no Python bindings: importing it loads this
// library, whose static TORCH_LIBRARY initialisers register the ops with the dispatcher.
// Built against the stable (limited) Python ABI, so one binary serves every CPython >= 3.10.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "flash_attn_ext native ops (see torch.ops.flash_attn_ext)", -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  // Whether the kernels were compiled with OpenMP: without it at::parallel_for is a serial loop
  // and every CPU kernel runs on one thread (the package warns on import; setup.py at build).
#ifdef _OPENMP
  const long openmp = 1;
#else
  const long openmp = 0;
#endif
  if (PyModule_AddIntConstant(module, "built_with_openmp", openmp) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}
