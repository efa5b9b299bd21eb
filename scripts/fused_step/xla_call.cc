// The single-pass kernel as an XLA:CPU custom call (API version 3, status
// returning), loaded into a TensorFlow process by fused_step.py --xla.
// Two targets: operands (g, w, row_prev, col_prev, lr[, m]); opaque
// "rows cols has_m mu eps".
//   sm3_fused_step_copy:     results (w', row', col'[, m']), new buffers.
//   sm3_fused_step_in_place: results (row', col'); w and m are written in
//     place. XLA is not told (TensorFlow's custom_call_v2 cannot declare an
//     output aliasing an operand), so this is a measurement only: it holds
//     while nothing else in the program reads w or m after the call.
#include <cstdio>
#include <string>

#include "kernel.h"
#include "xla/service/custom_call_status.h"
#include "xla/service/custom_call_target_registry.h"

namespace {

void Run(void* out, const void** in, const char* opaque, size_t opaque_len,
         bool in_place) {
  long rows = 0, cols = 0;
  int has_m = 0;
  float mu = 0.f, eps = 0.f;
  const std::string config(opaque, opaque_len);
  std::sscanf(config.c_str(), "%ld %ld %d %f %f", &rows, &cols, &has_m, &mu, &eps);
  void** results = static_cast<void**>(out);
  const float* w = static_cast<const float*>(in[1]);
  const float* m = has_m ? static_cast<const float*>(in[5]) : nullptr;
  const int first = in_place ? 0 : 1;  // where (row', col') are
  Sm3Args a{rows, cols, static_cast<const float*>(in[0]), w,
            in_place ? const_cast<float*>(w) : static_cast<float*>(results[0]),
            m,
            in_place ? const_cast<float*>(m)
                     : (has_m ? static_cast<float*>(results[3]) : nullptr),
            static_cast<const float*>(in[2]), static_cast<const float*>(in[3]),
            static_cast<float*>(results[first]),
            static_cast<float*>(results[first + 1]),
            *static_cast<const float*>(in[4]), mu, eps};
  Sm3Step(a);
}

}  // namespace

extern "C" void sm3_fused_step_copy(void* out, const void** in, const char* opaque,
                                    size_t opaque_len, XlaCustomCallStatus*) {
  Run(out, in, opaque, opaque_len, false);
}

extern "C" void sm3_fused_step_in_place(void* out, const void** in, const char* opaque,
                                        size_t opaque_len, XlaCustomCallStatus*) {
  Run(out, in, opaque, opaque_len, true);
}

XLA_CPU_REGISTER_CUSTOM_CALL_TARGET(sm3_fused_step_copy);
XLA_CPU_REGISTER_CUSTOM_CALL_TARGET(sm3_fused_step_in_place);
