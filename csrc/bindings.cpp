// Python bindings of fastrnn._C: thin, as everything else lives in recurrence.cpp and the walk (contract: fastrnn.h).
#include <torch/extension.h>

#include "fastrnn.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using py::arg;
  m.doc() = "fastrnn C++ CPU kernels";
  m.def("build_info", &fastrnn::build_info, "compiler, OpenMP, vector ISA and thread count of this build");
  m.def("has_direct_blas", &fastrnn::has_direct_blas, "whether GEMMs call torch's BLAS directly");
  m.def("cell_info", &fastrnn::cell_info, arg("cell_id"),
        "-> name, G, saved gates width, saved extra width (in H), has cell state, has projection, norm width (in H)");
  m.def("recurrence_forward", &fastrnn::recurrence_forward, arg("cell_id"), arg("gx"), arg("h0"), arg("c0"),
        arg("w_hh"), arg("b_hh"), arg("w_hr"), arg("batch_sizes"), arg("reverse"), arg("need_saved"),
        arg("bf16_gemm") = false, arg("norm") = py::none(), arg("zmask") = py::none(), arg("zkeep") = 1.0,
        "-> out, h_n, c_n|None, gates, extra (the last two empty unless need_saved)");
  m.def("recurrence_backward", &fastrnn::recurrence_backward, arg("cell_id"), arg("d_out"), arg("d_h_n"),
        arg("d_c_n"), arg("h0"), arg("c0"), arg("w_hh"), arg("b_hh"), arg("w_hr"), arg("batch_sizes"),
        arg("reverse"), arg("out"), arg("gates"), arg("extra"), arg("bf16_gemm") = false, arg("norm") = py::none(),
        arg("zmask") = py::none(), arg("zkeep") = 1.0,
        "-> d_gx, d_h0, d_c0|None, d_w_hh, d_b_hh|None, d_w_hr|None, d_extra|None, d_norm|None");
  m.def("layer_forward", &fastrnn::layer_forward, arg("cell_id"), arg("x"), arg("w_ih"), arg("b_ih"), arg("h0"),
        arg("c0"), arg("w_hh"), arg("b_hh"), arg("reverse"), arg("bf16_gemm") = false,
        "an unpacked layer in inference, its input projection made as the walk goes -> out, h_n, c_n|None");
  m.def("cell_step", &fastrnn::cell_step, arg("cell_id"), arg("x"), arg("h"), arg("c"), arg("w_ih"), arg("w_hh"),
        arg("b_ih"), arg("b_hh"), arg("bf16_gemm") = false,
        "one step of a Cell class (x W_ih^T + b_ih, then the cell's walk over T = 1) -> [h'] or [h', c']");
  m.def("linear", &fastrnn::linear, arg("x"), arg("w"), arg("b") = py::none(),
        "x [rows, I] W^T + b on the extension's GEMMs, differentiable (a layer's input projection in training)");
  m.def("own_gemm_enabled", &fastrnn::own_gemm_enabled,
        "whether float32 GEMMs of many rows run on the extension's own AVX-512 kernel rather than MKL");
}
