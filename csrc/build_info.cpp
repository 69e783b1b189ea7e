#include "fastrnn.h"

#include <ATen/Parallel.h>

#include <sstream>

namespace fastrnn {

std::string build_info() {
  std::ostringstream s;
#if defined(__clang__)
  s << "compiler=clang-" << __clang_major__ << "." << __clang_minor__;
#elif defined(__GNUC__)
  s << "compiler=gcc-" << __GNUC__ << "." << __GNUC_MINOR__;
#else
  s << "compiler=unknown";
#endif
#ifdef _OPENMP
  s << ";openmp=" << _OPENMP;
#else
  s << ";openmp=no";
#endif
#if defined(__AVX512F__)
  s << ";isa=avx512";
#elif defined(__AVX2__)
  s << ";isa=avx2";
#elif defined(__AVX__)
  s << ";isa=avx";
#elif defined(__ARM_NEON)
  s << ";isa=neon";
#else
  s << ";isa=scalar";
#endif
  s << ";threads=" << at::get_num_threads();
  return s.str();
}

}  // namespace fastrnn
