// sm3_tf's single-pass CPU kernel (sm3_tf/kernels/native/sm3_kernel.h)
// alone, against SGD, SGD with momentum and Adam written the same way (one
// loop per tensor, all OpenMP threads), over a model's variables: what the
// kernel costs outside XLA. Driven by fused_step.py, built like the kernel
// (-march=native, -ffp-contract=off); reads "rows cols" lines (cols 0: a
// vector) from the file named by argv[1]; argv[2] rounds. Checks the kernel
// bit for bit against a scalar loop of the rule first.
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <vector>

#include "../../sm3_tf/kernels/native/sm3_kernel.h"  // the kernel sm3_tf runs

namespace {

// The whole matrix on all OpenMP threads: rows split statically, one
// column-maxima buffer per thread (zero-filled), merged at the end, as
// sm3_tf's XLA handler shares a matrix among XLA's threads.
inline void Sm3Step(const sm3::StepArgs& a, float* row_out, float* col_out) {
  const int threads = omp_get_max_threads();
  std::vector<float> col_max(static_cast<size_t>(threads) * a.cols, 0.f);
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    const long per = (a.rows + threads - 1) / threads;
    sm3::Rows(a, std::min(a.rows, t * per), std::min(a.rows, (t + 1) * per), row_out,
              col_max.data() + static_cast<size_t>(t) * a.cols);
  }
  for (long j = 0; j < a.cols; ++j) {
    float x = 0.f;
    for (int t = 0; t < threads; ++t) x = std::max(x, col_max[static_cast<size_t>(t) * a.cols + j]);
    col_out[j] = x;
  }
}

// The same rule entry by entry, for the check: plain scalar C++ (float32
// momentum or none), rounded as the header says (no fused multiply-adds).
inline void Sm3StepScalar(const sm3::StepArgs& a, float* row_out, float* col_out) {
  const float* m = static_cast<const float*>(a.m);
  float* m_out = static_cast<float*>(a.m_out);
  std::fill(col_out, col_out + a.cols, 0.f);
  for (long i = 0; i < a.rows; ++i) {
    float row_max = 0.f;
    for (long j = 0; j < a.cols; ++j) {
      const long k = i * a.cols + j;
      float sq = a.g[k] * a.g[k];
      if (std::isnan(sq)) sq = std::numeric_limits<float>::infinity();
      const float nu = std::min(a.row_prev[i], a.col_prev[j]) + sq;
      row_max = std::max(row_max, nu);
      col_out[j] = std::max(col_out[j], nu);
      float u = nu == 0.f ? 0.f : a.g[k] / std::sqrt(nu + a.eps);
      if (a.momentum == sm3::Momentum::kF32) {
        u = a.mu * m[k] + a.one_minus_mu * u;
        m_out[k] = u;
      }
      a.w_out[k] = a.w[k] - a.lr * u;
    }
    row_out[i] = row_max;
  }
}

const float kLr = 1e-4f, kMu = 0.9f, kEps = 0.f;

struct Tensor {
  long rows, cols;  // cols == 0: a vector of `rows` entries
  std::vector<float> w, g, m, v, row, col, row_new, col_new;
  long size() const { return rows * (cols ? cols : 1); }
};

void Sgd(Tensor& t, bool momentum) {
  float* w = t.w.data(); const float* g = t.g.data(); float* m = t.m.data();
  const long n = t.size();
  if (momentum) {  // Keras's SGD: m = mu * m - lr * g; w += m
#pragma omp parallel for simd schedule(static)
    for (long k = 0; k < n; ++k) { m[k] = kMu * m[k] - kLr * g[k]; w[k] += m[k]; }
  } else {
#pragma omp parallel for simd schedule(static)
    for (long k = 0; k < n; ++k) w[k] -= kLr * g[k];
  }
}

void Adam(Tensor& t) {  // Keras's Adam, the bias corrections folded into lr
  float* w = t.w.data(); const float* g = t.g.data(); float* m = t.m.data();
  float* v = t.v.data();
  const long n = t.size();
  const float b1 = 0.9f, b2 = 0.999f, eps = 1e-7f;
#pragma omp parallel for simd schedule(static)
  for (long k = 0; k < n; ++k) {
    m[k] += (g[k] - m[k]) * (1.f - b1);
    v[k] += (g[k] * g[k] - v[k]) * (1.f - b2);
    w[k] -= kLr * m[k] / (std::sqrt(v[k]) + eps);
  }
}

void Sm3(Tensor& t, bool momentum) {
  if (t.cols == 0) {  // a vector's accumulator is full-size: Adagrad's step
    float* w = t.w.data(); const float* g = t.g.data(); float* m = t.m.data();
    float* acc = t.row.data();
    const long n = t.rows;
#pragma omp parallel for simd schedule(static)
    for (long k = 0; k < n; ++k) {
      const float nu = acc[k] + g[k] * g[k];
      acc[k] = nu;
      float u = nu == 0.f ? 0.f : g[k] / std::sqrt(nu + kEps);
      if (momentum) { u = kMu * m[k] + (1.f - kMu) * u; m[k] = u; }
      w[k] -= kLr * u;
    }
    return;
  }
  const sm3::StepArgs a{t.rows, t.cols, t.g.data(), t.w.data(), t.w.data(),
                        t.m.data(), t.m.data(),
                        momentum ? sm3::Momentum::kF32 : sm3::Momentum::kNone,
                        t.row.data(), t.col.data(), kLr, kMu, 1.f - kMu, kEps};
  Sm3Step(a, t.row_new.data(), t.col_new.data());
  t.row.swap(t.row_new);
  t.col.swap(t.col_new);
}

// The vectorized kernel against the scalar loop, bit for bit, on matrices
// whose widths leave every tail length (cols % 16) once.
bool Check() {
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.f, 1.f);
  for (long cols = 1; cols <= 48; ++cols) {
    const long rows = 1 + cols % 7 * 5, n = rows * cols;
    for (int momentum = 0; momentum < 2; ++momentum) {
      std::vector<float> g(n), w(n), m(n), rp(rows), cp(cols);
      for (auto& x : g) x = cols % 5 == 0 ? 0.f : normal(rng) * 1e-3f;  // all-zero: u = 0
      for (auto& x : w) x = normal(rng);
      for (auto& x : m) x = normal(rng) * 1e-3f;
      for (auto& x : rp) x = std::abs(normal(rng)) * 1e-6f;
      for (auto& x : cp) x = cols % 5 == 0 ? 0.f : std::abs(normal(rng)) * 1e-6f;
      std::vector<float> w1(n), w2(n), m1(n), m2(n), r1(rows), r2(rows), c1(cols), c2(cols);
      const auto kind = momentum ? sm3::Momentum::kF32 : sm3::Momentum::kNone;
      Sm3Step({rows, cols, g.data(), w.data(), w1.data(), m.data(), m1.data(), kind, rp.data(), cp.data(),
               kLr, kMu, 1.f - kMu, kEps}, r1.data(), c1.data());
      Sm3StepScalar({rows, cols, g.data(), w.data(), w2.data(), m.data(), m2.data(), kind, rp.data(), cp.data(),
                     kLr, kMu, 1.f - kMu, kEps}, r2.data(), c2.data());
      if (w1 != w2 || r1 != r2 || c1 != c2 || (momentum && m1 != m2)) {
        std::fprintf(stderr, "kernel differs from the scalar loop at %ld x %ld, momentum %d\n", rows, cols, momentum);
        return false;
      }
    }
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) { std::fprintf(stderr, "usage: bound SHAPES_FILE ROUNDS\n"); return 2; }
  if (!Check()) return 1;
  std::printf("check: the vector kernel (%ld lanes, -march=native) equals the scalar loop bit for bit "
              "(48 widths, with and without momentum)\n", sm3::kLanes);
  std::vector<Tensor> tensors;
  FILE* f = std::fopen(argv[1], "r");
  if (!f) { std::perror(argv[1]); return 2; }
  long rows, cols;
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.f, 1.f);
  while (std::fscanf(f, "%ld %ld", &rows, &cols) == 2) {
    Tensor t{rows, cols};
    const long n = t.size();
    t.w.resize(n); t.g.resize(n); t.m.assign(n, 0.f); t.v.assign(n, 0.f);
    for (auto& x : t.w) x = normal(rng) * 0.05f;
    for (auto& x : t.g) x = normal(rng) * 1e-3f;
    t.row.assign(cols ? rows : n, 0.f); t.row_new.assign(rows, 0.f);
    t.col.assign(cols, 0.f); t.col_new.assign(cols, 0.f);
    tensors.push_back(std::move(t));
  }
  std::fclose(f);
  const char* names[] = {"SGD", "SGD+m", "SM3 m0", "SM3 m0.9", "Adam"};
  const int kOptimizers = 5;
  const int rounds = std::atoi(argv[2]);
  std::vector<double> ms[kOptimizers];
  for (int round = -2; round < rounds; ++round) {  // 2 warm-up rounds
    for (int k = 0; k < kOptimizers; ++k) {
      const int o = (k + round + 2) % kOptimizers;  // rotating order
      const auto start = std::chrono::steady_clock::now();
      for (auto& t : tensors) {
        if (o < 2) Sgd(t, o == 1); else if (o < 4) Sm3(t, o == 3); else Adam(t);
      }
      const std::chrono::duration<double, std::milli> d = std::chrono::steady_clock::now() - start;
      if (round >= 0) ms[o].push_back(d.count());
    }
  }
  double med[kOptimizers];
  for (int o = 0; o < kOptimizers; ++o) {
    std::sort(ms[o].begin(), ms[o].end());
    med[o] = ms[o][ms[o].size() / 2];
    std::printf("  %-9s %8.2f ms\n", names[o], med[o]);
  }
  std::printf("  SM3 m0.9 / SGD+m %.2f (target <= 1.25); SM3 m0.9 / Adam %.2f (target <= 0.85); "
              "SM3 m0 / SGD %.2f (target <= 1.5)\n",
              med[3] / med[1], med[3] / med[4], med[2] / med[0]);
  return 0;
}
