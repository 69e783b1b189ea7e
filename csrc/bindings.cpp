// Python bindings of fastrnn._C: thin, as everything else lives in the per-cell sources.
#include "fastrnn.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastrnn C++ CPU kernels";
  m.def("build_info", &fastrnn::build_info, "compiler, OpenMP, vector ISA and thread count of this build");
}
