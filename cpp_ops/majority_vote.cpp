// Signum's majority vote (SPEC §3, Bernstein et al. 2019) on packed signs: the server counts the
// set bits of M rows per element and answers with two bit masks, sign of the sum (positive) and
// non-zero (the sum is 0 on a tie); workers unpack them to -1, 0, +1. Same bits and values as
// hvd_distef/_torch_kernels.py.
#include "kernels.h"

#include <ATen/Parallel.h>

#ifdef HVD_DISTEF_X86_GCC
#include <immintrin.h>
#endif

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kGrainBytes = 1 << 12;

HOT void vote_bytes(const uint8_t* rows, int64_t stride, int64_t m_rows, int64_t lo, int64_t hi, uint8_t* positive,
                    uint8_t* nonzero) {
  // one to three rows as bit logic (the sum of the signs: count 2c - M): M = 1, the row, never 0;
  // M = 2, both set, 0 where they differ; M = 3, two of three set, never 0
  if (m_rows == 1) {
    for (int64_t j = lo; j < hi; ++j) positive[j] = rows[j], nonzero[j] = 0xff;
    return;
  }
  if (m_rows == 2) {
    for (int64_t j = lo; j < hi; ++j) {
      const uint8_t a = rows[j], b = rows[stride + j];
      positive[j] = a & b;
      nonzero[j] = (uint8_t)~(a ^ b);
    }
    return;
  }
  if (m_rows == 3) {
    for (int64_t j = lo; j < hi; ++j) {
      const uint8_t a = rows[j], b = rows[stride + j], c = rows[2 * stride + j];
      positive[j] = (a & b) | (a & c) | (b & c);
      nonzero[j] = 0xff;
    }
    return;
  }
  for (int64_t j = lo; j < hi; ++j) {
    int32_t count[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t m = 0; m < m_rows; ++m) {
      const uint8_t v = rows[m * stride + j];
      for (int k = 0; k < 8; ++k) count[k] += (v >> k) & 1;
    }
    // sum of the M signs = 2·count − M
    uint8_t p = 0, z = 0;
    for (int k = 0; k < 8; ++k) {
      p |= (uint8_t)(2 * count[k] > m_rows) << k;
      z |= (uint8_t)(2 * count[k] != m_rows) << k;
    }
    positive[j] = p;
    nonzero[j] = z;
  }
}

HOT void unpack_vote_bytes(const uint8_t* positive, const uint8_t* nonzero, float* out, int64_t lo, int64_t hi) {
  for (int64_t j = lo; j < hi; ++j) {
    const float* sign = kSigns.v[positive[j]];
    const float* one = kOnes.v[nonzero[j]];
    for (int k = 0; k < 8; ++k) out[8 * j + k] = sign[k] * one[k];
  }
}

#ifdef HVD_DISTEF_X86_GCC
// Whole bytes [j, hi) of sign bits of v (bit set where v >= 0: true for -0.0, false for NaN), one
// compare and movemask per 8 elements; returns where it stopped.
__attribute__((target("avx2"))) int64_t pack_bytes_avx2(const float* v, uint8_t* bits, int64_t j, int64_t hi) {
  const __m256 zero = _mm256_setzero_ps();
  for (; j < hi; ++j)
    bits[j] = (uint8_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(v + 8 * j), zero, _CMP_GE_OQ));
  return j;
}
const bool kAvx2 = __builtin_cpu_supports("avx2");
#endif

// Signum's worker step over bytes [lo, hi) of the packed signs (elements 8·lo .. min(8·hi, n)):
// v = mu*m + (1 - mu)*g, m_out = v, or where mu = 0 v = g and m_out = m; bit = v >= 0.
void signum_bytes(const float* g, const float* m, float* m_out, int64_t n, const Segments& segs, int64_t lo,
                  int64_t hi, uint8_t* bits) {
  thread_local std::vector<float> v;
  const int64_t a0 = 8 * lo, b0 = std::min(8 * hi, n);
  v.resize(b0 - a0);
  float* vp = v.data() - a0;
  int64_t at = a0;
  auto run = [&](int64_t a, int64_t b, float mu, float omm) {
    if (mu == 0.0f) {
      std::copy(m + a, m + b, m_out + a);
      std::copy(g + a, g + b, vp + a);
      return;
    }
    for (int64_t i = a; i < b; ++i) {
      const float x = m[i] * mu;
      const float y = g[i] * omm;
      const float s = x + y;
      m_out[i] = s;
      vp[i] = s;
    }
  };
  for (const auto& s : segs) {
    const int64_t a = std::max(at, std::get<0>(s)), b = std::min(b0, std::get<1>(s));
    if (a >= b) continue;
    if (at < a) run(at, a, 0.0f, 1.0f);
    const double mu = std::get<2>(s);
    run(a, b, (float)mu, (float)(1.0 - mu));
    at = b;
  }
  if (at < b0) run(at, b0, 0.0f, 1.0f);
  int64_t j = lo;
#ifdef HVD_DISTEF_X86_GCC
  if (kAvx2) j = pack_bytes_avx2(vp, bits, j, std::min(hi, n / 8));
#endif
  for (; j < hi; ++j) {
    uint8_t byte = 0;
    const int64_t end = std::min<int64_t>(8, n - 8 * j);
    for (int k = 0; k < end; ++k) byte |= (uint8_t)(vp[8 * j + k] >= 0.0f) << k;
    bits[j] = byte;
  }
}

}  // namespace

// Signum's worker step in one pass (SPEC §3): per segment (start, stop, mu) of g, the momentum
// m' = mu*m + (1 - mu)*g into momentum_out (mu = 0: m' = m, and g's own signs are sent), and the
// packed signs of what is sent; returns them (ceil(n/8) bytes, bit set where >= 0).
at::Tensor signum_momentum(at::Tensor g, at::Tensor momentum, at::Tensor momentum_out, Segments segments) {
  for (const at::Tensor* t : {&g, &momentum, &momentum_out})
    TORCH_CHECK_VALUE(t->device().is_cpu() && t->dtype() == at::kFloat && t->is_contiguous() &&
                          t->numel() == g.numel(),
                      "g and the momentum buffers must be contiguous float32 CPU tensors of one length");
  const int64_t n = g.numel(), nbytes = (n + 7) / 8;
  auto bits = at::empty({nbytes}, g.options().dtype(at::kByte));
  const float* gp = g.data_ptr<float>();
  const float* mp = momentum.data_ptr<float>();
  float* mo = momentum_out.data_ptr<float>();
  uint8_t* bp = bits.data_ptr<uint8_t>();
  at::parallel_for(0, nbytes, kGrainBytes,
                   [&](int64_t lo, int64_t hi) { signum_bytes(gp, mp, mo, n, segments, lo, hi, bp); });
  return bits;
}

// rows: M packed sign vectors of ceil(numel/8) bytes each, concatenated. Returns 2·ceil(numel/8)
// bytes: the positive mask, then the non-zero mask (padding bits 0 in both).
at::Tensor majority_vote(at::Tensor rows, int64_t numel) {
  const int64_t b = (numel + 7) / 8;
  TORCH_CHECK_VALUE(rows.device().is_cpu() && rows.dtype() == at::kByte && rows.is_contiguous(),
                    "rows must be a contiguous uint8 CPU tensor");
  TORCH_CHECK_VALUE(b > 0 ? rows.numel() % b == 0 && rows.numel() > 0 : rows.numel() == 0, "rows has ",
                    rows.numel(), " bytes, not a positive multiple of ", b);
  const int64_t m_rows = b > 0 ? rows.numel() / b : 0;
  auto vote = at::zeros({2 * b}, rows.options());
  const uint8_t* r = rows.data_ptr<uint8_t>();
  uint8_t* v = vote.data_ptr<uint8_t>();
  at::parallel_for(0, b, kGrainBytes, [&](int64_t lo, int64_t hi) { vote_bytes(r, b, m_rows, lo, hi, v, v + b); });
  if (numel % 8) v[2 * b - 1] &= (uint8_t)((1 << (numel % 8)) - 1);  // padding counts 0 of M: not a tie
  return vote;
}

// The vote as float32 [numel]: +1, -1, or 0 where the non-zero bit is clear (written into out when given).
at::Tensor unpack_vote(at::Tensor vote, int64_t numel, c10::optional<at::Tensor> out_) {
  const int64_t b = (numel + 7) / 8;
  TORCH_CHECK_VALUE(vote.device().is_cpu() && vote.dtype() == at::kByte && vote.is_contiguous() &&
                        vote.numel() == 2 * b,
                    "vote must be 2*ceil(numel/8) contiguous uint8 bytes on the CPU");
  at::Tensor out = out_.has_value() ? *out_ : at::empty({numel}, at::dtype(at::kFloat));
  TORCH_CHECK_VALUE(out.device().is_cpu() && out.dtype() == at::kFloat && out.is_contiguous() &&
                        out.numel() == numel,
                    "out must be a contiguous float32 CPU tensor of numel elements");
  const uint8_t* v = vote.data_ptr<uint8_t>();
  float* o = out.data_ptr<float>();
  const int64_t whole = numel / 8;
  at::parallel_for(0, whole, kGrainBytes, [&](int64_t lo, int64_t hi) { unpack_vote_bytes(v, v + b, o, lo, hi); });
  for (int64_t i = whole * 8; i < numel; ++i) {
    const int k = i & 7;
    o[i] = kSigns.v[v[whole]][k] * kOnes.v[v[b + whole]][k];
  }
  return out;
}
