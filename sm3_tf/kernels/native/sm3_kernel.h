// One pass of SM3's dense rule over a (rows, cols) matrix: the update and
// both accumulator maxima from a single read of the gradient. XLA cannot
// fuse a row and a column reduction with the elementwise update, so it reads
// the gradient once per pass and writes `nu` out between them; this loop
// holds nothing of the variable's size. Written with GCC/Clang vector
// extensions as wide as the CPU's registers (16 floats with AVX-512, 8 with
// AVX, 4 otherwise: wider vectors than the registers compile to scalar
// code), compiled for the machine it runs on (-march=native).
//
// The rule is sm3_tf.rule's with beta2 = 1 (the running sum), rounded as
// NumPy rounds it (built with -ffp-contract=off: no fused multiply-adds):
//   sq  = g * g, or +inf where that is NaN
//   nu  = min(row_prev[i], col_prev[j]) + sq
//   u   = g / sqrt(nu + eps), or 0 where nu == 0
//   m'  = mu * m + one_minus_mu * u, stored (a bfloat16 m' rounded first)
//   w'  = w - lr * m'   (no momentum: m' = u)
//   row[i] = max_j nu;  col[j] = max_i nu
#ifndef SM3_TF_NATIVE_SM3_KERNEL_H_
#define SM3_TF_NATIVE_SM3_KERNEL_H_

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

namespace sm3 {

#if defined(__AVX512F__)
constexpr long kLanes = 16;
#elif defined(__AVX__)
constexpr long kLanes = 8;
#else
constexpr long kLanes = 4;
#endif
typedef float Floats __attribute__((vector_size(kLanes * sizeof(float))));
typedef uint32_t Bits __attribute__((vector_size(kLanes * sizeof(uint32_t))));

// How the momentum is stored: none, float32, or bfloat16 (rounded to
// nearest even, as XLA converts float32 to bfloat16).
enum class Momentum { kNone = 0, kF32 = 1, kBF16 = 2 };

inline Floats Splat(float x) { return Floats{} + x; }

// The first n <= kLanes entries at p; the other lanes 0.
__attribute__((always_inline)) inline Floats Load(const float* p, long n) {
  Floats v = {};
  std::memcpy(&v, p, n * sizeof(float));
  return v;
}

__attribute__((always_inline)) inline void Store(float* p, Floats v, long n) { std::memcpy(p, &v, n * sizeof(float)); }

__attribute__((always_inline)) inline Floats LoadBF16(const uint16_t* p, long n) {
  uint16_t half[kLanes] = {};
  std::memcpy(half, p, n * sizeof(uint16_t));
  Bits bits;
  for (long l = 0; l < kLanes; ++l) bits[l] = static_cast<uint32_t>(half[l]) << 16;
  return reinterpret_cast<Floats&>(bits);
}

// v rounded to the nearest bfloat16 (ties to even; NaN stays NaN), as a
// float32: its low 16 bits are 0.
__attribute__((always_inline)) inline Floats RoundToBF16(Floats v) {
  const Bits bits = reinterpret_cast<Bits&>(v);
  Bits rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  for (long l = 0; l < kLanes; ++l)
    if (v[l] != v[l]) rounded[l] = 0x7FC00000u;
  return reinterpret_cast<Floats&>(rounded);
}

// Stores v, already rounded (RoundToBF16), as bfloat16.
__attribute__((always_inline)) inline void StoreBF16(uint16_t* p, Floats v, long n) {
  const Bits bits = reinterpret_cast<Bits&>(v) >> 16;
  uint16_t half[kLanes];
  for (long l = 0; l < kLanes; ++l) half[l] = static_cast<uint16_t>(bits[l]);
  std::memcpy(p, half, n * sizeof(uint16_t));
}

inline Floats Sqrt(Floats x) {
  Floats r;
  for (long l = 0; l < kLanes; ++l) r[l] = __builtin_sqrtf(x[l]);
  return r;
}

inline Floats Max(Floats x, Floats y) { return x > y ? x : y; }

struct StepArgs {
  long rows, cols;
  const float* g;
  const float* w;
  float* w_out;      // may equal w or g
  const void* m;     // float or bfloat16, as `momentum` says; may equal m_out
  void* m_out;
  Momentum momentum;
  const float* row_prev;  // (rows,)
  const float* col_prev;  // (cols,)
  float lr, mu, one_minus_mu, eps;  // one_minus_mu: 1 - mu rounded once, as
                                    // sm3_tf.rule computes it
};

// Entries [j, j + n) of row i (n = kLanes but at a row's end): writes their
// update, folds nu into row_max and col_max.
template <Momentum kMomentum>
__attribute__((always_inline)) inline void Block(const StepArgs& a, long base, long j, long n, Floats prev_i,
                  Floats& row_max, float* col_max) {
  const Floats zero = {};
  const Floats g = Load(a.g + base + j, n);
  Floats sq = g * g;
  sq = sq >= zero ? sq : Splat(std::numeric_limits<float>::infinity());
  const Floats col_prev = Load(a.col_prev + j, n);
  const Floats nu = (prev_i < col_prev ? prev_i : col_prev) + sq;
  row_max = Max(nu, row_max);  // lanes past n hold nu = 0
  Store(col_max + j, Max(nu, Load(col_max + j, n)), n);
  Floats step = nu == zero ? zero : g / Sqrt(nu + Splat(a.eps));
  if (kMomentum == Momentum::kF32) {
    const Floats m = Load(static_cast<const float*>(a.m) + base + j, n);
    step = Splat(a.mu) * m + Splat(a.one_minus_mu) * step;
    Store(static_cast<float*>(a.m_out) + base + j, step, n);
  } else if (kMomentum == Momentum::kBF16) {
    const Floats m = LoadBF16(static_cast<const uint16_t*>(a.m) + base + j, n);
    step = RoundToBF16(Splat(a.mu) * m + Splat(a.one_minus_mu) * step);
    StoreBF16(static_cast<uint16_t*>(a.m_out) + base + j, step, n);
  }
  Store(a.w_out + base + j, Load(a.w + base + j, n) - Splat(a.lr) * step, n);
}

// Row i: writes its update, returns max_j nu and folds nu into col_max.
// Whole blocks take a constant width, so their loads and stores are vector
// instructions; the row's last, partial block goes through a zeroed copy.
template <Momentum kMomentum>
float Row(const StepArgs& a, long i, float* col_max) {
  const long c = a.cols, base = i * c, whole = c - c % kLanes;
  const Floats prev_i = Splat(a.row_prev[i]);
  Floats row_max = {};
  for (long j = 0; j < whole; j += kLanes)
    Block<kMomentum>(a, base, j, kLanes, prev_i, row_max, col_max);
  if (whole < c) Block<kMomentum>(a, base, whole, c - whole, prev_i, row_max, col_max);
  float result = 0.f;
  for (long l = 0; l < kLanes; ++l) result = std::max(result, row_max[l]);
  return result;
}

// Rows [begin, end): their maxima into row_out[begin, end), the column
// maxima folded into col_max (one buffer per thread, zero-filled).
inline void Rows(const StepArgs& a, long begin, long end, float* row_out, float* col_max) {
  for (long i = begin; i < end; ++i) {
    switch (a.momentum) {
      case Momentum::kNone: row_out[i] = Row<Momentum::kNone>(a, i, col_max); break;
      case Momentum::kF32: row_out[i] = Row<Momentum::kF32>(a, i, col_max); break;
      case Momentum::kBF16: row_out[i] = Row<Momentum::kBF16>(a, i, col_max); break;
    }
  }
}

}  // namespace sm3

#endif  // SM3_TF_NATIVE_SM3_KERNEL_H_
