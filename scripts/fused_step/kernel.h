// One pass of the dense SM3 rule over a (rows, cols) matrix: the update and
// both accumulator maxima from a single read of the gradient. An experiment
// for docs/performance.md ("A single-pass kernel, measured"), not part of
// the package: it needs AVX-512F, and it is what XLA:CPU cannot generate
// (no fusion of a row and a column reduction with an elementwise update).
//
// The rule is rule.dense_step's, with beta2 = 1 (the running sum):
//   nu  = min(row_prev[i], col_prev[j]) + g * g   (the square rounded first)
//   u   = g / sqrt(nu + eps) where nu > 0, else 0
//   m'  = mu * m + (1 - mu) * u;  w' = w - lr * m'   (momentum: m' replaces u)
//   row[i] = max_j nu;  col[j] = max_i nu
#ifndef SM3_FUSED_STEP_KERNEL_H_
#define SM3_FUSED_STEP_KERNEL_H_

#ifndef __AVX512F__
#error "scripts/fused_step needs AVX-512F (compile with -march=native on a CPU that has it)"
#endif

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

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
  for (long j = 0; j < c; j += 16) {
    const __mmask16 k = c - j >= 16 ? static_cast<__mmask16>(0xFFFF)
                                    : static_cast<__mmask16>((1u << (c - j)) - 1);
    const __m512 g = _mm512_maskz_loadu_ps(k, gi + j);
    const __m512 sq = _mm512_mul_ps(g, g);  // rounded before the add
    const __m512 nu = _mm512_add_ps(
        _mm512_min_ps(prev_i, _mm512_maskz_loadu_ps(k, a.col_prev + j)), sq);
    row_max = _mm512_mask_max_ps(row_max, k, row_max, nu);
    _mm512_mask_storeu_ps(col_max + j, k,
                          _mm512_max_ps(_mm512_maskz_loadu_ps(k, col_max + j), nu));
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
  return _mm512_reduce_max_ps(row_max);
}

// Rows [begin, end): their maxima into row_out, the column maxima folded
// into `col_max` (one buffer per thread).
inline void Sm3Rows(const Sm3Args& a, long begin, long end, float* col_max) {
  for (long i = begin; i < end; ++i) a.row_out[i] = Sm3Row(a, i, col_max);
}

// The whole matrix on all OpenMP threads: rows split statically, one
// column-maxima buffer per thread, merged at the end.
inline void Sm3Step(const Sm3Args& a) {
  const int threads = omp_get_max_threads();
  std::vector<float> col_max(static_cast<size_t>(threads) * a.cols, 0.f);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    const long per = (a.rows + threads - 1) / threads;
    Sm3Rows(a, std::min(a.rows, t * per), std::min(a.rows, (t + 1) * per),
            col_max.data() + static_cast<size_t>(t) * a.cols);
  }
  for (long j = 0; j < a.cols; ++j) {
    float x = 0.f;
    for (int t = 0; t < threads; ++t) x = std::max(x, col_max[static_cast<size_t>(t) * a.cols + j]);
    a.col_out[j] = x;
  }
}

// A vector (rank <= 1): its accumulator is full-size, nu = acc + g * g
// (Adagrad's step); entries [begin, end).
inline void Sm3VectorRange(long begin, long end, const float* g, const float* acc,
                           float* acc_out, const float* w, float* w_out,
                           const float* m, float* m_out, float lr, float mu, float eps) {
  const __m512 zero = _mm512_setzero_ps(), veps = _mm512_set1_ps(eps),
               vlr = _mm512_set1_ps(lr), vmu = _mm512_set1_ps(mu),
               one_minus_mu = _mm512_set1_ps(1.f - mu);
  for (long j = begin; j < end; j += 16) {
    const __mmask16 k = end - j >= 16 ? static_cast<__mmask16>(0xFFFF)
                                      : static_cast<__mmask16>((1u << (end - j)) - 1);
    const __m512 vg = _mm512_maskz_loadu_ps(k, g + j);
    const __m512 nu = _mm512_add_ps(_mm512_maskz_loadu_ps(k, acc + j), _mm512_mul_ps(vg, vg));
    _mm512_mask_storeu_ps(acc_out + j, k, nu);
    const __mmask16 positive = _mm512_cmp_ps_mask(nu, zero, _CMP_GT_OQ);
    __m512 u = _mm512_maskz_div_ps(positive, vg, _mm512_sqrt_ps(_mm512_add_ps(nu, veps)));
    if (m) {
      u = _mm512_fmadd_ps(vmu, _mm512_maskz_loadu_ps(k, m + j), _mm512_mul_ps(one_minus_mu, u));
      _mm512_mask_storeu_ps(m_out + j, k, u);
    }
    _mm512_mask_storeu_ps(w_out + j, k, _mm512_fnmadd_ps(vlr, u, _mm512_maskz_loadu_ps(k, w + j)));
  }
}

// The same rule entry by entry, for the check: plain scalar C++.
inline void Sm3StepScalar(const Sm3Args& a) {
  std::fill(a.col_out, a.col_out + a.cols, 0.f);
  for (long i = 0; i < a.rows; ++i) {
    float row_max = 0.f;
    for (long j = 0; j < a.cols; ++j) {
      const long k = i * a.cols + j;
      const float sq = a.g[k] * a.g[k];
      const float nu = std::min(a.row_prev[i], a.col_prev[j]) + sq;
      row_max = std::max(row_max, nu);
      a.col_out[j] = std::max(a.col_out[j], nu);
      float u = nu > 0.f ? a.g[k] / std::sqrt(nu + a.eps) : 0.f;
      if (a.m) {
        u = std::fma(a.mu, a.m[k], (1.f - a.mu) * u);
        a.m_out[k] = u;
      }
      a.w_out[k] = std::fma(-a.lr, u, a.w[k]);
    }
    a.row_out[i] = row_max;
  }
}

#endif  // SM3_FUSED_STEP_KERNEL_H_
