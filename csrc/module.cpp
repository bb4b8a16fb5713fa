// The extension module dist_rec._C. Importing it runs the static
// TORCH_LIBRARY registrars of every op family; it defines no Python functions
// of its own (ops are reached through torch.ops.dist_rec).
#include <Python.h>

// PyMODINIT_FUNC declares the entry point extern "C" with default visibility.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",
      "dist_rec native ops (registered with torch.library)",
      -1,
      nullptr,
  };
  return PyModule_Create(&module_def);
}
