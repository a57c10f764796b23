// Signum's majority vote (SPEC §3, Bernstein et al. 2019) on packed signs: the server counts the
// set bits of M rows per element and answers with two bit masks, sign of the sum (positive) and
// non-zero (the sum is 0 on a tie); workers unpack them to -1, 0, +1. Same bits and values as
// hvd_distef/_torch_kernels.py.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace {

constexpr int64_t kGrainBytes = 1 << 12;

HOT void vote_bytes(const uint8_t* rows, int64_t stride, int64_t m_rows, int64_t lo, int64_t hi, uint8_t* positive,
                    uint8_t* nonzero) {
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

}  // namespace

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
