// fastrnn C++ extension: shared declarations. Sources: one file per cell (lstm.cpp, gru.cpp, rnn.cpp),
// bindings only in bindings.cpp.
#pragma once
#include <torch/extension.h>

#include <string>

namespace fastrnn {

// Compiler, OpenMP and vector ISA the extension was built with, and ATen's parallel backend.
std::string build_info();

}  // namespace fastrnn
