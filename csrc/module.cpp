// The Python module flash_attn_ext._C holds no Python bindings: importing it loads this
// library, whose static TORCH_LIBRARY initialisers register the ops with the dispatcher.
// Built against the stable (limited) Python ABI, so one binary serves every CPython >= 3.10.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C",
                                          "flash_attn_ext native ops (see torch.ops.flash_attn_ext)", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
