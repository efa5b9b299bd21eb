// SM3's one-pass steps (sm3_kernel.h) as XLA FFI handlers for XLA:CPU.
// Built by sm3_tf/kernels/native.py against the FFI headers of the XLA that
// runs it (TensorFlow's or jaxlib's), and registered with it at load time.
// Typed FFI: a C ABI, no XLA C++ types cross it; work is shared with XLA's
// intra-op thread pool.
//
//   sm3_tf_step: (g, w, lr, acc_0, ..., acc_k[, m]) -> (w', acc_0', ...[, m'])
// one dense step of a variable of rank k + 1 >= 2 seen as a (rows, cols)
// matrix: rows the product of its first `lead` axes, cols of the rest (the
// view of sm3_tf.rule.split_axes). acc_a has dims[a] entries. m is float32
// or bfloat16 (attribute momentum: 0 none, 1 float32, 2 bfloat16).
// Attributes: dims (i64 array: the variable's shape), lead, momentum (i64),
// mu, one_minus_mu (1 - mu, rounded once), eps (f32). sm3_tf declares every
// result over an operand (w' over g or over w, the others over their own):
// each entry of g, w and m is read before it is written, and the
// accumulators are read whole before any of them is written.
//
//   sm3_tf_sparse: (ids, values, w, lr, acc_0, ..., acc_k) -> (w', acc_0', ...)
// an embedding's sparse step without momentum: only the rows in `ids` are
// read and written. Attributes: dims (i64 array), eps (f32).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <thread>
#include <vector>

#include "sm3_kernel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using F32 = ffi::Buffer<ffi::F32>;
using F32Out = ffi::ResultBuffer<ffi::F32>;

// Runs body(chunk, slot) for every chunk in [0, chunks): the calling thread
// and up to `slots - 1` pool tasks take chunks from one counter, and `slot`
// numbers the threads that took any. The caller waits only for chunks
// already taken, never for a task the pool has not started (its threads
// may all be busy, running this very call): no deadlock. Returns how many
// slots were used.
template <typename Body>
int ParallelChunks(ffi::ThreadPool& pool, long chunks, int slots, Body body) {
  struct Shared {
    std::atomic<long> next{0};
    std::atomic<int> taken{0};
    std::atomic<int> running{0};
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, chunks, body]() {
    shared->running.fetch_add(1);
    long chunk = shared->next.fetch_add(1);
    if (chunk < chunks) {
      const int slot = shared->taken.fetch_add(1);  // < slots: one per thread
      for (; chunk < chunks; chunk = shared->next.fetch_add(1)) body(chunk, slot);
    }
    shared->running.fetch_sub(1);
  };
  const long helpers = std::min<long>(slots - 1, chunks - 1);
  for (long t = 0; t < helpers; ++t) {
    auto task = work;  // the pool owns a copy; `shared` outlives a late start
    pool.Schedule(std::move(task));
  }
  work();
  while (shared->running.load() != 0) std::this_thread::yield();
  return shared->taken.load();
}

// Calls f(i, digits) for i = 0..n-1, with digits the row-major digits of i
// in `dims` (an odometer: no division per entry).
template <typename F>
void ForEachIndex(const std::vector<long>& dims, long n, F f) {
  std::vector<long> digits(dims.size(), 0);
  for (long i = 0; i < n; ++i) {
    f(i, digits);
    for (long a = static_cast<long>(dims.size()) - 1; a >= 0; --a) {
      if (++digits[a] < dims[a]) break;
      digits[a] = 0;
    }
  }
}

// One group of axes (the row axes or the column axes), `dims` their sizes
// and n their product: prev[i] = min over the group's accumulators acc[a]
// of acc[a][i_a], with i_0, i_1, ... the row-major digits of i.
void MinOfAccumulators(const float* const* acc, const std::vector<long>& dims, long n,
                       float* prev) {
  ForEachIndex(dims, n, [&](long i, const std::vector<long>& digits) {
    float x = acc[0][digits[0]];
    for (size_t a = 1; a < dims.size(); ++a) x = std::min(x, acc[a][digits[a]]);
    prev[i] = x;
  });
}

// The converse: out[a][i_a] = max of maxima[i] over the i with digit i_a.
void MaxOverEachAxis(const float* maxima, const std::vector<long>& dims, long n,
                     float* const* out) {
  for (size_t a = 0; a < dims.size(); ++a) std::fill(out[a], out[a] + dims[a], 0.f);
  ForEachIndex(dims, n, [&](long i, const std::vector<long>& digits) {
    for (size_t a = 0; a < dims.size(); ++a) {
      float& x = out[a][digits[a]];
      x = std::max(x, maxima[i]);
    }
  });
}

// out[j] = the max of per_thread[t * cols + j] over the `used` threads.
void MaxOverThreads(const float* per_thread, int used, long cols, float* out) {
  for (long j = 0; j < cols; ++j) {
    float x = 0.f;
    for (int t = 0; t < used; ++t) x = std::max(x, per_thread[static_cast<size_t>(t) * cols + j]);
    out[j] = x;
  }
}

// About 256 KiB of gradient per chunk of rows.
long RowsPerChunk(long cols) { return std::max(1L, 65536 / std::max(1L, cols)); }

int Slots(ffi::ThreadPool& pool) {
  return static_cast<int>(std::max<int64_t>(1, pool.num_threads() + 1));
}

ffi::Error Step(ffi::ThreadPool pool, F32 g, F32 w, F32 lr, ffi::RemainingArgs args,
                F32Out w_out, ffi::RemainingRets rets, ffi::Span<const int64_t> dims,
                int64_t lead, int64_t momentum, float mu, float one_minus_mu,
                float eps) {
  const long rank = static_cast<long>(dims.size());
  const long n = static_cast<long>(g.element_count());
  const long expected = rank + (momentum ? 1 : 0);
  if (rank < 2 || lead < 1 || lead >= rank || momentum < 0 || momentum > 2 ||
      static_cast<long>(args.size()) != expected || static_cast<long>(rets.size()) != expected)
    return ffi::Error::InvalidArgument("sm3_tf_step: operands do not match dims and momentum");
  if (static_cast<long>(w.element_count()) != n || static_cast<long>(w_out->element_count()) != n)
    return ffi::Error::InvalidArgument("sm3_tf_step: g, w and w' differ in size");
  std::vector<const float*> acc(rank);
  std::vector<float*> acc_out(rank);
  std::vector<long> lead_dims, trail_dims;
  long rows = 1, cols = 1;
  for (long a = 0; a < rank; ++a) {
    const long d = static_cast<long>(dims[a]);
    auto in = args.get<F32>(a);
    auto out = rets.get<F32>(a);
    if (in.has_error() || out.has_error() || static_cast<long>(in.value().element_count()) != d ||
        static_cast<long>(out.value()->element_count()) != d)
      return ffi::Error::InvalidArgument("sm3_tf_step: accumulator a must be f32 of dims[a]");
    acc[a] = in.value().typed_data();
    acc_out[a] = out.value()->typed_data();
    (a < lead ? lead_dims : trail_dims).push_back(d);
    (a < lead ? rows : cols) *= d;
  }
  if (rows * cols != n) return ffi::Error::InvalidArgument("sm3_tf_step: dims do not match g");
  const void* m = nullptr;
  void* m_out = nullptr;
  if (momentum) {
    auto in = args.get<ffi::AnyBuffer>(rank);
    auto out = rets.get<ffi::AnyBuffer>(rank);
    const ffi::DataType type = momentum == 1 ? ffi::DataType::F32 : ffi::DataType::BF16;
    if (in.has_error() || out.has_error() || in.value().element_type() != type ||
        out.value()->element_type() != type ||
        static_cast<long>(in.value().element_count()) != n ||
        static_cast<long>(out.value()->element_count()) != n)
      return ffi::Error::InvalidArgument("sm3_tf_step: momentum must match its type and g's size");
    m = in.value().untyped_data();
    m_out = out.value()->untyped_data();
  }
  // The rows' and columns' prev, and their maxima, then the per-axis ones.
  std::vector<float> row_prev(rows), col_prev(cols), row_max(rows), col_max_all(cols);
  MinOfAccumulators(acc.data(), lead_dims, rows, row_prev.data());
  MinOfAccumulators(acc.data() + lead, trail_dims, cols, col_prev.data());
  const sm3::StepArgs step{rows, cols, g.typed_data(), w.typed_data(), w_out->typed_data(),
                           m, m_out, static_cast<sm3::Momentum>(momentum), row_prev.data(),
                           col_prev.data(), *lr.typed_data(), mu, one_minus_mu, eps};
  const long chunk_rows = RowsPerChunk(cols);
  const long chunks = (rows + chunk_rows - 1) / chunk_rows;
  const int slots = Slots(pool);
  std::vector<float> col_max(static_cast<size_t>(slots) * cols, 0.f);
  const int used = ParallelChunks(pool, chunks, slots, [&](long chunk, int slot) {
    sm3::Rows(step, chunk * chunk_rows, std::min(rows, (chunk + 1) * chunk_rows),
              row_max.data(), col_max.data() + static_cast<size_t>(slot) * cols);
  });
  MaxOverThreads(col_max.data(), used, cols, col_max_all.data());
  MaxOverEachAxis(row_max.data(), lead_dims, rows, acc_out.data());
  MaxOverEachAxis(col_max_all.data(), trail_dims, cols, acc_out.data() + lead);
  return ffi::Error::Success();
}

// An embedding's sparse step without momentum (sm3_tf.kernels.sparse has
// the rule). Operands ids (n, s32: rows of w, repeats allowed), values (n,
// cols: one slice per id), w (rows, cols), lr, then the accumulators: axis
// 0's (rows,), then the other axes'. Results w', acc_0', ..., each over its
// operand, and only the touched entries written. Slices of a repeated row
// are summed in their order before anything is squared; a touched row's
// accumulator becomes the max of its old value and the row's nu, the other
// axes' the max of theirs and the touched rows' nu. The distinct rows are
// shared out among XLA's threads, as the dense step's rows are.
ffi::Error Sparse(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> ids, F32 values, F32 w, F32 lr,
                  ffi::RemainingArgs args, F32Out w_out, ffi::RemainingRets rets,
                  ffi::Span<const int64_t> dims, float eps) {
  const long rank = static_cast<long>(dims.size());
  if (rank < 2 || static_cast<long>(args.size()) != rank || static_cast<long>(rets.size()) != rank)
    return ffi::Error::InvalidArgument("sm3_tf_sparse: rank >= 2, one accumulator per axis");
  const long rows = static_cast<long>(dims[0]);
  long cols = 1;
  std::vector<long> trail_dims;
  std::vector<float*> acc(rank);
  for (long a = 0; a < rank; ++a) {
    auto in = args.get<F32>(a);
    auto out = rets.get<F32>(a);
    if (in.has_error() || out.has_error() ||
        static_cast<long>(in.value().element_count()) != dims[a] ||
        out.value()->typed_data() != in.value().typed_data())
      return ffi::Error::InvalidArgument(
          "sm3_tf_sparse: accumulator a must be f32 of dims[a], written over its operand");
    acc[a] = out.value()->typed_data();
    if (a > 0) {
      trail_dims.push_back(static_cast<long>(dims[a]));
      cols *= dims[a];
    }
  }
  const long n = static_cast<long>(ids.element_count());
  if (static_cast<long>(values.element_count()) != n * cols ||
      static_cast<long>(w.element_count()) != rows * cols)
    return ffi::Error::InvalidArgument("sm3_tf_sparse: operands do not match dims");
  // Untouched entries are not written: w' must be w's buffer.
  if (w_out->typed_data() != w.typed_data())
    return ffi::Error::InvalidArgument("sm3_tf_sparse: w' must be written over w");
  const int32_t* id = ids.typed_data();
  for (long i = 0; i < n; ++i)
    if (id[i] < 0 || id[i] >= rows)
      return ffi::Error::InvalidArgument(
          "sm3_tf_sparse: an index is outside the variable's rows");
  std::vector<long> order(n);
  for (long i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [id](long x, long y) { return id[x] < id[y]; });
  std::vector<float> col_prev(cols);
  MinOfAccumulators(acc.data() + 1, trail_dims, cols, col_prev.data());
  // The distinct rows (runs of equal ids in `order`), in chunks shared out
  // among the threads: each row is one thread's, so no two write the same
  // entry; column maxima per thread.
  std::vector<long> starts;
  for (long s = 0; s < n; ++s)
    if (s == 0 || id[order[s]] != id[order[s - 1]]) starts.push_back(s);
  starts.push_back(n);
  const long distinct = static_cast<long>(starts.size()) - 1;
  const long rows_per_chunk = RowsPerChunk(cols);
  const long chunks = (distinct + rows_per_chunk - 1) / rows_per_chunk;
  const int slots = Slots(pool);
  std::vector<float> g_all(static_cast<size_t>(slots) * cols),
      col_max_all(static_cast<size_t>(slots) * cols, 0.f);
  const float* v = values.typed_data();
  float* var = w_out->typed_data();
  const float rate = *lr.typed_data();
  const int used = ParallelChunks(pool, chunks, slots, [&](long chunk, int slot) {
    float* g = g_all.data() + static_cast<size_t>(slot) * cols;
    float* slot_col_max = col_max_all.data() + static_cast<size_t>(slot) * cols;
    const long last = std::min(distinct, (chunk + 1) * rows_per_chunk);
    for (long k = chunk * rows_per_chunk; k < last; ++k) {
      const long r = id[order[starts[k]]];
      std::copy(v + order[starts[k]] * cols, v + (order[starts[k]] + 1) * cols, g);
      for (long e = starts[k] + 1; e < starts[k + 1]; ++e) {
        const float* slice = v + order[e] * cols;
        for (long j = 0; j < cols; ++j) g[j] += slice[j];
      }
      const float prev = acc[0][r];
      const sm3::StepArgs step{1, cols, g, var + r * cols, var + r * cols, nullptr, nullptr,
                               sm3::Momentum::kNone, &prev, col_prev.data(), rate, 0.f, 1.f, eps};
      acc[0][r] = std::max(prev, sm3::Row<sm3::Momentum::kNone>(step, 0, slot_col_max));
    }
  });
  std::vector<float> col_max(cols);
  MaxOverThreads(col_max_all.data(), used, cols, col_max.data());
  std::vector<std::vector<float>> tail_max(rank - 1);
  std::vector<float*> tail_out(rank - 1);
  for (long a = 1; a < rank; ++a) {
    tail_max[a - 1].assign(dims[a], 0.f);
    tail_out[a - 1] = tail_max[a - 1].data();
  }
  MaxOverEachAxis(col_max.data(), trail_dims, cols, tail_out.data());
  for (long a = 1; a < rank; ++a)
    for (long j = 0; j < dims[a]; ++j) acc[a][j] = std::max(acc[a][j], tail_out[a - 1][j]);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Sm3StepHandler, Step,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .RemainingArgs()
                                  .Ret<F32>()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("dims")
                                  .Attr<int64_t>("lead")
                                  .Attr<int64_t>("momentum")
                                  .Attr<float>("mu")
                                  .Attr<float>("one_minus_mu")
                                  .Attr<float>("eps"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(Sm3SparseHandler, Sparse,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .RemainingArgs()
                                  .Ret<F32>()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("dims")
                                  .Attr<float>("eps"));

// Registers the handlers with the XLA whose FFI API is `api` (TensorFlow's,
// which sm3_tf.kernels.native looks up in TensorFlow's library; JAX takes
// them from Python with jax.ffi.register_ffi_target). Returns 0 on success.
extern "C" int sm3_tf_register(const XLA_FFI_Api* api) {
  if (ffi::Ffi::RegisterStaticHandler(api, "sm3_tf_step", "Host", Sm3StepHandler) != nullptr)
    return 1;
  if (ffi::Ffi::RegisterStaticHandler(api, "sm3_tf_sparse", "Host", Sm3SparseHandler) != nullptr)
    return 2;
  return 0;
}

// For sm3_tf.kernels.native: this library's ABI version; a mismatch means a
// stale build.
extern "C" int sm3_tf_native_version() { return 10; }
