// SM3's single-pass matrix step (sm3_kernel.h) as an XLA FFI handler for
// XLA:CPU ("Host"), registered with the XLA inside TensorFlow when
// sm3_tf.cpu_kernel loads this library. Typed FFI: a C ABI, no XLA C++
// types cross it; work is shared with XLA's own intra-op thread pool.
//
//   sm3_tf_step: (g, w, lr, acc[, m]) -> (w', acc'[, m'])
// for a variable of rank >= 2 seen as a (rows, cols) matrix: rows the
// product of its first `lead` axes, cols of the rest (sm3_tf.rule's view);
// acc holds one vector per axis end to end (axis 0 first, dims[a] entries
// each). Attributes: dims (i64 array: the variable's shape), lead (i64),
// mu, eps (f32). sm3_tf declares every result over its operand
// (output_operand_aliases): each entry of w and m is read before it is
// written, and acc is read whole before any of it is written.
//
//   sm3_tf_vectors: (lr, acc, g_0, w_0[, m_0], g_1, ...)
//                -> (acc', w'_0[, m'_0], w'_1, ...)
// for a step's scalars and vectors together, acc the accumulator they
// share. Attributes: offsets (i64 array: where each vector's entries start
// in acc), momentum (i64, 0 or 1: whether m is there), mu, eps (f32).
//
//   sm3_tf_sparse: (ids, values, w, lr, acc) -> (w', acc')
// an embedding's sparse step without momentum, touched rows only.
// Attributes: dims (i64 array), eps (f32).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <thread>
#include <vector>

#include "sm3_kernel.h"
#include "xla/ffi/api/ffi.h"

namespace xla::ffi {
const XLA_FFI_Api* GetXlaFfiApi();  // exported by TensorFlow's library
}

namespace {

namespace ffi = xla::ffi;
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
  auto work = [shared, chunks, slots, body]() {
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

// max(x, y), NaN where either is NaN (as XLA's max).
inline float MaxKeepingNaN(float x, float y) {
  if (std::isnan(x)) return x;
  return std::isnan(y) || y > x ? y : x;
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
// and n their product: prev[i] = min over the group's accumulators of
// acc_a[i_a], with i_0, i_1, ... the row-major digits of i.
void MinOfAccumulators(const float* const* acc, const std::vector<long>& dims,
                       long n, float* prev) {
  if (dims.size() == 1) {
    std::copy(acc[0], acc[0] + n, prev);
    return;
  }
  ForEachIndex(dims, n, [&](long i, const std::vector<long>& digits) {
    float x = acc[0][digits[0]];
    for (size_t a = 1; a < dims.size(); ++a) x = std::min(x, acc[a][digits[a]]);
    prev[i] = x;
  });
}

// The converse: out_a[i_a] = max of maxima[i] over the i with digit i_a.
void MaxOverEachAxis(const float* maxima, const std::vector<long>& dims, long n,
                     float* const* out) {
  if (dims.size() == 1) {
    std::copy(maxima, maxima + n, out[0]);
    return;
  }
  for (size_t a = 0; a < dims.size(); ++a) std::fill(out[a], out[a] + dims[a], 0.f);
  ForEachIndex(dims, n, [&](long i, const std::vector<long>& digits) {
    for (size_t a = 0; a < dims.size(); ++a) {
      float& x = out[a][digits[a]];
      x = MaxKeepingNaN(x, maxima[i]);
    }
  });
}

// out[j] = the max of per_thread[t * cols + j] over the `used` threads' rows
// of column maxima (NaN kept).
void MaxOverThreads(const float* per_thread, int used, long cols, float* out) {
  for (long j = 0; j < cols; ++j) {
    float x = 0.f;
    for (int t = 0; t < used; ++t) x = MaxKeepingNaN(x, per_thread[static_cast<size_t>(t) * cols + j]);
    out[j] = x;
  }
}

ffi::Error Step(ffi::ThreadPool pool, F32 g, F32 w, F32 lr, F32 acc_in,
                ffi::RemainingArgs args, F32Out w_out, F32Out acc_out_buffer,
                ffi::RemainingRets rets, ffi::Span<const int64_t> dims, int64_t lead,
                float mu, float eps) {
  const long n = static_cast<long>(g.element_count());
  const long rank = static_cast<long>(dims.size());
  const bool has_m = args.size() == 1;
  if (rank < 2 || lead < 1 || lead >= rank || args.size() > 1 || rets.size() != args.size())
    return ffi::Error::InvalidArgument("sm3_tf_step: operands do not match dims and lead");
  if (static_cast<long>(w.element_count()) != n || static_cast<long>(w_out->element_count()) != n)
    return ffi::Error::InvalidArgument("sm3_tf_step: g, w and w' differ in size");
  std::vector<const float*> acc(rank);
  std::vector<float*> acc_out(rank);
  std::vector<long> lead_dims, trail_dims;
  long rows = 1, cols = 1, offset = 0;
  for (long a = 0; a < rank; ++a) {
    const long d = static_cast<long>(dims[a]);
    acc[a] = acc_in.typed_data() + offset;
    acc_out[a] = acc_out_buffer->typed_data() + offset;
    offset += d;
    (a < lead ? lead_dims : trail_dims).push_back(d);
    (a < lead ? rows : cols) *= d;
  }
  if (rows * cols != n || static_cast<long>(acc_in.element_count()) != offset ||
      static_cast<long>(acc_out_buffer->element_count()) != offset)
    return ffi::Error::InvalidArgument("sm3_tf_step: dims do not match g and acc");
  const float* m = nullptr;
  float* m_out = nullptr;
  if (has_m) {
    auto m_arg = args.get<F32>(0);
    auto m_ret = rets.get<F32>(0);
    if (m_arg.has_error() || m_ret.has_error() ||
        static_cast<long>(m_arg.value().element_count()) != n ||
        static_cast<long>(m_ret.value()->element_count()) != n)
      return ffi::Error::InvalidArgument("sm3_tf_step: momentum must be f32, g's size");
    m = m_arg.value().typed_data();
    m_out = m_ret.value()->typed_data();
  }
  // The rows' and columns' prev, and their maxima, then the per-axis ones.
  std::vector<float> row_prev(rows), col_prev(cols), row_max(rows), col_max_all(cols);
  MinOfAccumulators(acc.data(), lead_dims, rows, row_prev.data());
  MinOfAccumulators(acc.data() + lead, trail_dims, cols, col_prev.data());
  const Sm3Args a{rows, cols, g.typed_data(), w.typed_data(), w_out->typed_data(),
                  m, m_out, row_prev.data(), col_prev.data(), row_max.data(),
                  col_max_all.data(), *lr.typed_data(), mu, eps};
  // About 256 KiB of gradient per chunk.
  const long chunk_rows = std::max(1L, 65536 / std::max(1L, cols));
  const long chunks = (rows + chunk_rows - 1) / chunk_rows;
  const int slots = static_cast<int>(std::max<int64_t>(1, pool.num_threads() + 1));
  std::vector<float> col_max(static_cast<size_t>(slots) * cols, 0.f);
  const int used = ParallelChunks(pool, chunks, slots, [&](long chunk, int slot) {
    Sm3Rows(a, chunk * chunk_rows, std::min(rows, (chunk + 1) * chunk_rows),
            col_max.data() + static_cast<size_t>(slot) * cols);
  });
  MaxOverThreads(col_max.data(), used, cols, col_max_all.data());
  MaxOverEachAxis(row_max.data(), lead_dims, rows, acc_out.data());
  MaxOverEachAxis(col_max_all.data(), trail_dims, cols, acc_out.data() + lead);
  return ffi::Error::Success();
}

// All of a step's scalars and vectors in one call, where XLA:CPU would run
// two loops for each (the accumulator and the update): ResNet-50's 160
// biases and normalization parameters (docs/performance.md, item 11).
// Operands lr, acc (the vector_accumulator they share), then (g, w[, m]) per
// vector; results acc', then (w'[, m']) per vector, each over its operand.
// Vector v's accumulator is acc[offsets[v], offsets[v] + its size); entries
// of acc no vector covers are left as they are (acc' is acc's buffer). On
// the calling thread: ResNet-50's vectors hold 53k entries in all.
ffi::Error Vectors(F32 lr, F32 acc, ffi::RemainingArgs args, F32Out acc_out,
                   ffi::RemainingRets rets, ffi::Span<const int64_t> offsets,
                   int64_t momentum, float mu, float eps) {
  const long in_per = momentum ? 3 : 2, out_per = momentum ? 2 : 1;
  const long count = static_cast<long>(offsets.size());
  const long total = static_cast<long>(acc.element_count());
  if (static_cast<long>(args.size()) != count * in_per ||
      static_cast<long>(rets.size()) != count * out_per ||
      static_cast<long>(acc_out->element_count()) != total)
    return ffi::Error::InvalidArgument(
        "sm3_tf_vectors: operands are not acc, then (g, w[, m]) per offset");
  for (long v = 0; v < count; ++v) {
    const float* in[3] = {nullptr, nullptr, nullptr};
    float* out[2] = {nullptr, nullptr};
    long n = -1;
    for (long i = 0; i < in_per; ++i) {
      auto b = args.get<F32>(v * in_per + i);
      if (b.has_error()) return ffi::Error::InvalidArgument("sm3_tf_vectors: operands must be f32");
      if (n < 0) n = static_cast<long>(b.value().element_count());
      if (static_cast<long>(b.value().element_count()) != n)
        return ffi::Error::InvalidArgument("sm3_tf_vectors: a vector's operands differ in size");
      in[i] = b.value().typed_data();
    }
    for (long i = 0; i < out_per; ++i) {
      auto b = rets.get<F32>(v * out_per + i);
      if (b.has_error() || static_cast<long>(b.value()->element_count()) != n)
        return ffi::Error::InvalidArgument("sm3_tf_vectors: results must be f32, the operands' size");
      out[i] = b.value()->typed_data();
    }
    const long offset = static_cast<long>(offsets[v]);
    if (offset < 0 || offset + n > total)
      return ffi::Error::InvalidArgument("sm3_tf_vectors: an offset is outside acc");
    Sm3Vector(Sm3VectorArgs{n, in[0], in[1], out[0], acc.typed_data() + offset,
                            acc_out->typed_data() + offset, momentum ? in[2] : nullptr,
                            momentum ? out[1] : nullptr, *lr.typed_data(), mu, eps});
  }
  return ffi::Error::Success();
}

// An embedding's sparse step without momentum: only the rows in `ids` are
// read and written (sm3_tf.sparse has the rule; the spec, "Sparse
// gradients"). Operands ids (n, s32: rows of w, repeats allowed), values
// (n, cols: one slice per id), w (rows, cols: the variable, its axis 0 the
// rows), lr, acc (the accumulator: axis 0's vector, then the other axes',
// end to end); results w', acc', each over its operand, and only the
// touched entries written. Slices of a repeated row are summed in their
// order before anything is squared; a touched row's accumulator becomes the
// max of its old value and the row's nu, the other axes' the max of theirs
// and the touched rows' nu. The distinct rows are shared out among XLA's
// threads, as the matrix step's rows are.
ffi::Error Sparse(ffi::ThreadPool pool, ffi::Buffer<ffi::S32> ids, F32 values, F32 w, F32 lr,
                  F32 acc_in, F32Out w_out, F32Out acc_out, ffi::Span<const int64_t> dims,
                  float eps) {
  const long rank = static_cast<long>(dims.size());
  if (rank < 2) return ffi::Error::InvalidArgument("sm3_tf_sparse: dims must have rank >= 2");
  const long rows = static_cast<long>(dims[0]);
  long cols = 1, total = rows;
  std::vector<long> trail_dims;
  for (long a = 1; a < rank; ++a) {
    trail_dims.push_back(static_cast<long>(dims[a]));
    cols *= dims[a];
    total += dims[a];
  }
  const long n = static_cast<long>(ids.element_count());
  if (static_cast<long>(values.element_count()) != n * cols ||
      static_cast<long>(w.element_count()) != rows * cols ||
      static_cast<long>(acc_in.element_count()) != total)
    return ffi::Error::InvalidArgument("sm3_tf_sparse: operands do not match dims");
  // Untouched entries are not written: the results must be the operands'
  // buffers, as sm3_tf declares them (output_operand_aliases).
  if (w_out->typed_data() != w.typed_data() || acc_out->typed_data() != acc_in.typed_data())
    return ffi::Error::InvalidArgument("sm3_tf_sparse: results must alias w and acc");
  const int32_t* id = ids.typed_data();
  for (long i = 0; i < n; ++i)
    if (id[i] < 0 || id[i] >= rows)
      return ffi::Error::InvalidArgument("sm3_tf_sparse: an index is outside the variable's rows");
  std::vector<long> order(n);
  for (long i = 0; i < n; ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [id](long x, long y) { return id[x] < id[y]; });
  float* acc = acc_out->typed_data();
  std::vector<const float*> tail_in(rank - 1);
  std::vector<float*> tail_max(rank - 1);
  std::vector<std::vector<float>> tail_max_storage(rank - 1);
  for (long a = 0, offset = rows; a < rank - 1; offset += trail_dims[a], ++a) {
    tail_in[a] = acc + offset;
    tail_max_storage[a].assign(trail_dims[a], 0.f);
    tail_max[a] = tail_max_storage[a].data();
  }
  std::vector<float> col_prev(cols), col_max(cols);
  MinOfAccumulators(tail_in.data(), trail_dims, cols, col_prev.data());
  // The distinct rows (runs of equal ids in `order`), shared out among the
  // threads in chunks of about 256 KiB of gradient: each row is one
  // thread's, so no two write the same entry; column maxima per thread.
  std::vector<long> starts;
  for (long s = 0; s < n; ++s)
    if (s == 0 || id[order[s]] != id[order[s - 1]]) starts.push_back(s);
  starts.push_back(n);
  const long distinct = static_cast<long>(starts.size()) - 1;
  const long rows_per_chunk = std::max(1L, 65536 / std::max(1L, cols));
  const long chunks = (distinct + rows_per_chunk - 1) / rows_per_chunk;
  const int slots = static_cast<int>(std::max<int64_t>(1, pool.num_threads() + 1));
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
      const float prev = acc[r];
      const Sm3Args a{1, cols, g, var + r * cols, var + r * cols, nullptr, nullptr,
                      &prev, col_prev.data(), nullptr, nullptr, rate, 0.f, eps};
      acc[r] = MaxKeepingNaN(prev, Sm3Row(a, 0, slot_col_max));
    }
  });
  MaxOverThreads(col_max_all.data(), used, cols, col_max.data());
  MaxOverEachAxis(col_max.data(), trail_dims, cols, tail_max.data());
  for (long a = 0, offset = rows; a < rank - 1; offset += trail_dims[a], ++a)
    for (long j = 0; j < trail_dims[a]; ++j)
      acc[offset + j] = MaxKeepingNaN(acc[offset + j], tail_max[a][j]);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(Sm3VectorsHandler, Vectors,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .RemainingArgs()
                                  .Ret<F32>()
                                  .RemainingRets()
                                  .Attr<ffi::Span<const int64_t>>("offsets")
                                  .Attr<int64_t>("momentum")
                                  .Attr<float>("mu")
                                  .Attr<float>("eps"));

XLA_FFI_REGISTER_HANDLER(xla::ffi::GetXlaFfiApi(), "sm3_tf_vectors", "Host",
                         Sm3VectorsHandler);

XLA_FFI_DEFINE_HANDLER_SYMBOL(Sm3StepHandler, Step,
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
                                  .Attr<ffi::Span<const int64_t>>("dims")
                                  .Attr<int64_t>("lead")
                                  .Attr<float>("mu")
                                  .Attr<float>("eps"));

XLA_FFI_REGISTER_HANDLER(xla::ffi::GetXlaFfiApi(), "sm3_tf_step", "Host",
                         Sm3StepHandler);

XLA_FFI_DEFINE_HANDLER_SYMBOL(Sm3SparseHandler, Sparse,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Ret<F32>()
                                  .Attr<ffi::Span<const int64_t>>("dims")
                                  .Attr<float>("eps"));

XLA_FFI_REGISTER_HANDLER(xla::ffi::GetXlaFfiApi(), "sm3_tf_sparse", "Host",
                         Sm3SparseHandler);

// For sm3_tf.cpu_kernel: this library's ABI version; a mismatch means a
// stale build.
extern "C" int sm3_tf_native_version() { return 7; }
