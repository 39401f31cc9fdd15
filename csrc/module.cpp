// The Python module rlp_engine._C. It has no Python functions of its own: importing it runs the
// static registrars of every TORCH_LIBRARY_FRAGMENT / TORCH_LIBRARY_IMPL in csrc/, which makes the
// ops available as torch.ops.rlp.* (real torch ops: they work under torch.compile and opcheck).
#include <Python.h>
#include <torch/library.h>

// The namespace is declared once here; every op file adds to it with TORCH_LIBRARY_FRAGMENT.
TORCH_LIBRARY(rlp, m) {}

static struct PyModuleDef rlp_module = {PyModuleDef_HEAD_INIT, "_C", "rlp-engine C++/CUDA ops", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&rlp_module); }
