// The single-pass kernel as XLA FFI handlers (typed API: a C ABI, the same
// handler for TensorFlow's XlaCallModule and jax.ffi), loaded into a
// TensorFlow process by fused_step.py --xla. Work is shared with XLA's own
// intra-op thread pool (no OpenMP threads beside XLA's).
//
//   sm3_matrix: (g, w, row_prev, col_prev, lr[, m]) -> (w', row maxima,
//               col maxima[, m']); attributes mu, eps.
//   sm3_vector: (g, w, acc, lr[, m]) -> (w', acc'[, m']).
// The caller declares w' over w (and acc' over acc, m' over m): every entry
// is read before it is written, so the buffers may be shared.
#include <algorithm>
#include <atomic>
#include <memory>
#include <thread>
#include <vector>

#include "kernel.h"
#include "xla/ffi/api/ffi.h"

namespace xla::ffi {
const XLA_FFI_Api* GetXlaFfiApi();  // exported by TensorFlow's library
}

namespace {

namespace ffi = xla::ffi;
using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;

// Runs body(chunk, slot) for every chunk in [0, chunks): the calling thread
// and up to `pool.num_threads()` pool tasks take chunks from one counter;
// `slot` (< slots) numbers the threads that took any. The caller waits only
// for chunks already taken, so a task the pool starts late (or never, when
// its threads are all busy) cannot make it wait.
template <typename Body>
int ParallelChunks(ffi::ThreadPool& pool, long chunks, int slots, Body body) {
  struct Shared {
    std::atomic<long> next{0};
    std::atomic<int> taken{0};
    std::atomic<int> running{0};
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, chunks, slots, body]() {
    shared->running.fetch_add(1);
    long chunk = shared->next.fetch_add(1);
    if (chunk < chunks) {
      const int slot = shared->taken.fetch_add(1);
      if (slot < slots) {
        for (; chunk < chunks; chunk = shared->next.fetch_add(1)) body(chunk, slot);
      }
    }
    shared->running.fetch_sub(1);
  };
  const int helpers = static_cast<int>(std::min<long>(
      std::min<long>(pool.num_threads(), slots - 1), chunks - 1));
  for (int t = 0; t < helpers; ++t) {
    auto task = work;  // Schedule takes ownership of a copy
    pool.Schedule(std::move(task));
  }
  work();
  while (shared->running.load() != 0) std::this_thread::yield();
  return std::min(shared->taken.load(), slots);
}

int Slots(ffi::ThreadPool& pool) {
  return static_cast<int>(std::max<int64_t>(1, pool.num_threads() + 1));
}

ffi::Error Matrix(ffi::ThreadPool pool, F32 g, F32 w, F32 row_prev, F32 col_prev,
                  F32 lr, ffi::RemainingArgs rest, F32Out w_out, F32Out row_out,
                  F32Out col_out, ffi::RemainingRets rest_out, float mu, float eps) {
  const auto dims = g.dimensions();
  if (dims.size() != 2) return ffi::Error::InvalidArgument("sm3_matrix: g must be 2-D");
  const float* m = nullptr;
  float* m_out = nullptr;
  if (rest.size() == 1) {
    auto m_arg = rest.get<F32>(0);
    auto m_ret = rest_out.get<F32>(0);
    if (m_arg.has_error() || m_ret.has_error())
      return ffi::Error::InvalidArgument("sm3_matrix: momentum must be f32");
    m = m_arg.value().typed_data();
    m_out = m_ret.value()->typed_data();
  }
  const long rows = dims[0], cols = dims[1];
  Sm3Args a{rows, cols, g.typed_data(), w.typed_data(), w_out->typed_data(), m, m_out,
            row_prev.typed_data(), col_prev.typed_data(), row_out->typed_data(),
            col_out->typed_data(), *lr.typed_data(), mu, eps};
  // About 256 KiB of gradient a chunk.
  const long chunk_rows = std::max(1L, 65536 / std::max(1L, cols));
  const long chunks = (rows + chunk_rows - 1) / chunk_rows;
  const int slots = Slots(pool);
  std::vector<float> col_max(static_cast<size_t>(slots) * cols, 0.f);
  const int used = ParallelChunks(pool, chunks, slots, [&](long chunk, int slot) {
    Sm3Rows(a, chunk * chunk_rows, std::min(rows, (chunk + 1) * chunk_rows),
            col_max.data() + static_cast<size_t>(slot) * cols);
  });
  for (long j = 0; j < cols; ++j) {
    float x = 0.f;
    for (int t = 0; t < used; ++t) x = std::max(x, col_max[static_cast<size_t>(t) * cols + j]);
    a.col_out[j] = x;
  }
  return ffi::Error::Success();
}

ffi::Error Vector(ffi::ThreadPool pool, F32 g, F32 w, F32 acc, F32 lr,
                  ffi::RemainingArgs rest, F32Out w_out, F32Out acc_out,
                  ffi::RemainingRets rest_out, float mu, float eps) {
  const float* m = nullptr;
  float* m_out = nullptr;
  if (rest.size() == 1) {
    auto m_arg = rest.get<F32>(0);
    auto m_ret = rest_out.get<F32>(0);
    if (m_arg.has_error() || m_ret.has_error())
      return ffi::Error::InvalidArgument("sm3_vector: momentum must be f32");
    m = m_arg.value().typed_data();
    m_out = m_ret.value()->typed_data();
  }
  const long n = static_cast<long>(g.element_count());
  const long chunk = 65536;
  const float rate = *lr.typed_data();
  ParallelChunks(pool, (n + chunk - 1) / chunk, Slots(pool), [&](long c, int) {
    Sm3VectorRange(c * chunk, std::min(n, (c + 1) * chunk), g.typed_data(),
                   acc.typed_data(), acc_out->typed_data(), w.typed_data(),
                   w_out->typed_data(), m, m_out, rate, mu, eps);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Sm3MatrixHandler, Matrix,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .RemainingArgs()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .RemainingRets()
                                  .Attr<float>("mu")
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Sm3VectorHandler, Vector,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .RemainingArgs()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .RemainingRets()
                                  .Attr<float>("mu")
                                  .Attr<float>("eps"));

XLA_FFI_REGISTER_HANDLER(xla::ffi::GetXlaFfiApi(), "sm3_matrix", "Host", Sm3MatrixHandler);
XLA_FFI_REGISTER_HANDLER(xla::ffi::GetXlaFfiApi(), "sm3_vector", "Host", Sm3VectorHandler);
