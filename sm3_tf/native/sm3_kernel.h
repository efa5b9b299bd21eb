// One pass of SM3's dense rule over a (rows, cols) matrix: the update and
// both accumulator maxima from a single read of the gradient (AVX-512F).
// XLA:CPU cannot generate this loop (it does not fuse a row and a column
// reduction with an elementwise update; docs/performance.md), so on CPU
// sm3_tf can run it as an XLA FFI custom call (sm3_xla_cpu.cc).
//
// The rule is sm3_tf.rule.dense_step's with beta2 = 1 (the running sum):
//   nu  = min(row_prev[i], col_prev[j]) + g * g   (the square rounded first)
//   u   = g / sqrt(nu + eps) where nu > 0, else 0
//   m'  = mu * m + (1 - mu) * u;  w' = w - lr * m'   (no momentum: m' = u)
//   row[i] = max_j nu;  col[j] = max_i nu   (NaN kept, as XLA's max keeps it)
#ifndef SM3_TF_NATIVE_SM3_KERNEL_H_
#define SM3_TF_NATIVE_SM3_KERNEL_H_

#ifndef __AVX512F__
#error "sm3_kernel.h needs AVX-512F (-mavx512f)"
#endif

#include <immintrin.h>

#include <cmath>

struct Sm3Args {
  long rows, cols;
  const float* g;
  const float* w;         // read
  float* w_out;           // written (may equal w)
  const float* m;         // nullptr: no momentum
  float* m_out;           // may equal m
  const float* row_prev;  // (rows,)
  const float* col_prev;  // (cols,)
  float* row_out;         // (rows,): may not alias row_prev
  float* col_out;         // (cols,)
  float lr, mu, eps;
};

// Row i of the matrix, 16 entries at a time; returns max_j nu, folds the
// column maxima into `col_max`.
inline float Sm3Row(const Sm3Args& a, long i, float* col_max) {
  const long c = a.cols;
  const float* gi = a.g + i * c;
  const __m512 zero = _mm512_setzero_ps(), eps = _mm512_set1_ps(a.eps),
               lr = _mm512_set1_ps(a.lr), mu = _mm512_set1_ps(a.mu),
               one_minus_mu = _mm512_set1_ps(1.f - a.mu),
               prev_i = _mm512_set1_ps(a.row_prev[i]);
  __m512 row_max = zero;
  __mmask16 nan_lanes = 0;
  for (long j = 0; j < c; j += 16) {
    const __mmask16 k = c - j >= 16 ? static_cast<__mmask16>(0xFFFF)
                                    : static_cast<__mmask16>((1u << (c - j)) - 1);
    const __m512 g = _mm512_maskz_loadu_ps(k, gi + j);
    const __m512 sq = _mm512_mul_ps(g, g);  // rounded before the add
    const __m512 nu = _mm512_add_ps(
        _mm512_min_ps(prev_i, _mm512_maskz_loadu_ps(k, a.col_prev + j)), sq);
    // max_ps(x, y) is y where either is NaN: a NaN already in col_max
    // stays; a new one is caught in nan_lanes and written after the loop.
    row_max = _mm512_mask_max_ps(row_max, k, nu, row_max);
    _mm512_mask_storeu_ps(col_max + j, k,
                          _mm512_max_ps(nu, _mm512_maskz_loadu_ps(k, col_max + j)));
    nan_lanes = _kor_mask16(nan_lanes, _mm512_mask_cmp_ps_mask(k, nu, nu, _CMP_UNORD_Q));
    const __mmask16 positive = _mm512_cmp_ps_mask(nu, zero, _CMP_GT_OQ);
    __m512 u = _mm512_maskz_div_ps(positive, g,
                                   _mm512_sqrt_ps(_mm512_add_ps(nu, eps)));
    if (a.m) {
      u = _mm512_fmadd_ps(mu, _mm512_maskz_loadu_ps(k, a.m + i * c + j),
                          _mm512_mul_ps(one_minus_mu, u));
      _mm512_mask_storeu_ps(a.m_out + i * c + j, k, u);
    }
    _mm512_mask_storeu_ps(
        a.w_out + i * c + j, k,
        _mm512_fnmadd_ps(lr, u, _mm512_maskz_loadu_ps(k, a.w + i * c + j)));
  }
  if (nan_lanes) {  // a NaN in nu (a NaN gradient): kept, as XLA keeps it
    for (long j = 0; j < c; ++j) {
      // min as _mm512_min_ps takes it: x < y ? x : y.
      const float x = a.row_prev[i], y = a.col_prev[j];
      if (std::isnan((x < y ? x : y) + gi[j] * gi[j])) col_max[j] = __builtin_nanf("");
    }
    return __builtin_nanf("");
  }
  return _mm512_reduce_max_ps(row_max);
}

// Rows [begin, end): their maxima into row_out, the column maxima folded
// into `col_max` (one buffer per thread, zero-filled by the caller).
inline void Sm3Rows(const Sm3Args& a, long begin, long end, float* col_max) {
  for (long i = begin; i < end; ++i) a.row_out[i] = Sm3Row(a, i, col_max);
}

// A vector (rank <= 1: one accumulator entry per entry, Adagrad's form):
//   nu = acc + g * g;  acc' = nu;  u, m' and w' as above.
// Each entry is read before it is written: the outputs may equal the inputs.
struct Sm3VectorArgs {
  long n;
  const float* g;
  const float* w;
  float* w_out;
  const float* acc;
  float* acc_out;
  const float* m;  // nullptr: no momentum
  float* m_out;
  float lr, mu, eps;
};

inline void Sm3Vector(const Sm3VectorArgs& a) {
  const __m512 zero = _mm512_setzero_ps(), eps = _mm512_set1_ps(a.eps),
               lr = _mm512_set1_ps(a.lr), mu = _mm512_set1_ps(a.mu),
               one_minus_mu = _mm512_set1_ps(1.f - a.mu);
  for (long j = 0; j < a.n; j += 16) {
    const __mmask16 k = a.n - j >= 16 ? static_cast<__mmask16>(0xFFFF)
                                      : static_cast<__mmask16>((1u << (a.n - j)) - 1);
    const __m512 g = _mm512_maskz_loadu_ps(k, a.g + j);
    const __m512 nu = _mm512_add_ps(_mm512_maskz_loadu_ps(k, a.acc + j),
                                    _mm512_mul_ps(g, g));  // square rounded first
    _mm512_mask_storeu_ps(a.acc_out + j, k, nu);
    const __mmask16 positive = _mm512_cmp_ps_mask(nu, zero, _CMP_GT_OQ);
    __m512 u = _mm512_maskz_div_ps(positive, g,
                                   _mm512_sqrt_ps(_mm512_add_ps(nu, eps)));
    if (a.m) {
      u = _mm512_fmadd_ps(mu, _mm512_maskz_loadu_ps(k, a.m + j),
                          _mm512_mul_ps(one_minus_mu, u));
      _mm512_mask_storeu_ps(a.m_out + j, k, u);
    }
    _mm512_mask_storeu_ps(a.w_out + j, k,
                          _mm512_fnmadd_ps(lr, u, _mm512_maskz_loadu_ps(k, a.w + j)));
  }
}

#endif  // SM3_TF_NATIVE_SM3_KERNEL_H_
