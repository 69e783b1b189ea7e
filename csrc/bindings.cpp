// Python bindings of fastrnn._C: thin, as everything else lives in the per-cell sources (contract: fastrnn.h).
#include <torch/extension.h>

#include "fastrnn.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using py::arg;
  m.doc() = "fastrnn C++ CPU kernels";
  m.def("build_info", &fastrnn::build_info, "compiler, OpenMP, vector ISA and thread count of this build");
  m.def("has_direct_blas", &fastrnn::has_direct_blas, "whether GEMMs call torch's BLAS directly");
  m.def("lstm_forward", &fastrnn::lstm_forward, arg("gx"), arg("h0"), arg("c0"), arg("w_hh"), arg("b_hh"),
        arg("w_hr"), arg("batch_sizes"), arg("reverse"), arg("need_saved"),
        "-> out, h_n, c_n, gates, extra (the last two empty unless need_saved)");
  m.def("lstm_backward", &fastrnn::lstm_backward, arg("d_out"), arg("d_h_n"), arg("d_c_n"), arg("h0"), arg("c0"),
        arg("w_hh"), arg("b_hh"), arg("w_hr"), arg("batch_sizes"), arg("reverse"), arg("out"), arg("gates"),
        arg("extra"), "-> d_gx, d_h0, d_c0, d_w_hh, d_b_hh|None, d_w_hr|None");
  m.def("gru_forward", &fastrnn::gru_forward, arg("gx"), arg("h0"), arg("w_hh"), arg("b_hh"), arg("batch_sizes"),
        arg("reverse"), arg("need_saved"), "-> out, h_n, gates, extra (the last two empty unless need_saved)");
  m.def("gru_backward", &fastrnn::gru_backward, arg("d_out"), arg("d_h_n"), arg("h0"), arg("w_hh"), arg("b_hh"),
        arg("batch_sizes"), arg("reverse"), arg("out"), arg("gates"), arg("extra"),
        "-> d_gx, d_h0, d_w_hh, d_b_hh|None");
  m.def("rnn_forward", &fastrnn::rnn_forward, arg("gx"), arg("h0"), arg("w_hh"), arg("b_hh"), arg("batch_sizes"),
        arg("reverse"), arg("relu"), "-> out, h_n");
  m.def("rnn_backward", &fastrnn::rnn_backward, arg("d_out"), arg("d_h_n"), arg("h0"), arg("w_hh"), arg("b_hh"),
        arg("batch_sizes"), arg("reverse"), arg("out"), arg("relu"), "-> d_gx, d_h0, d_w_hh, d_b_hh|None");
}
