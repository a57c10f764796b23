// Fused CPU kernels for blockwise scaled sign with error feedback (SPEC §1, §2).
//
// Same signatures, bit order and results as hvd_distef/_torch_kernels.py: sign bits packed 8 per
// byte, element i -> bit i%8 of byte i/8, bit set where x >= 0 (sign(0) = +1, also for -0.0).
// Packed bits are identical to the torch path; scales agree to float rounding (the L1 sums are
// accumulated in another order). Built with -ffp-contract=off so that p = d + r*e rounds the
// product before the sum, exactly as the torch path does.
//
// Work is cut into "rounds" of consecutive blocks of about kRound elements (a huge block is a round
// of its own), and rounds into tasks of at most kChunk elements. Per round: pass 1 computes
// p = d + r*e, stores p in e and sums |p| per task (parallel over tasks); the block scales follow;
// pass 2 packs the signs and writes e = p - scale*sign (parallel over tasks). A round's p is still
// in cache for pass 2, so the step moves close to the minimum of ~12 bytes per element. Bytes of
// bits shared by two tasks are OR-ed atomically.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 15;
constexpr int64_t kRound = 1 << 18;

struct Task {
  int64_t block, lo, hi;
};

struct Layout {
  std::vector<int64_t> offsets;  // block b spans [offsets[b], offsets[b+1])
  std::vector<Task> tasks;
  std::vector<size_t> round_ends;  // task index where each round ends
};

Layout make_layout(const std::vector<int64_t>& block_sizes, int64_t numel) {
  Layout l;
  l.offsets.resize(block_sizes.size() + 1, 0);
  for (size_t b = 0; b < block_sizes.size(); ++b) {
    TORCH_CHECK_VALUE(block_sizes[b] > 0, "block sizes must be positive, block ", b, " has ", block_sizes[b]);
    l.offsets[b + 1] = l.offsets[b] + block_sizes[b];
  }
  TORCH_CHECK_VALUE(l.offsets.back() == numel, "block sizes sum to ", l.offsets.back(), ", the vector has ",
                    numel, " elements");
  int64_t in_round = 0;
  for (size_t b = 0; b < block_sizes.size(); ++b) {
    int64_t n = block_sizes[b];
    if (in_round > 0 && in_round + n > kRound) {
      l.round_ends.push_back(l.tasks.size());
      in_round = 0;
    }
    for (int64_t lo = l.offsets[b]; lo < l.offsets[b + 1]; lo += kChunk)
      l.tasks.push_back({(int64_t)b, lo, std::min(lo + kChunk, l.offsets[b + 1])});
    in_round += n;
  }
  if (l.round_ends.empty() || l.round_ends.back() != l.tasks.size()) l.round_ends.push_back(l.tasks.size());
  return l;
}

// Calls fn(lo, hi, ratio) for the parts of [lo, hi) covered by each segment (ratio 0 elsewhere).
template <class F>
void for_each_segment(const Segments& segs, int64_t lo, int64_t hi, F fn) {
  int64_t at = lo;
  for (const auto& s : segs) {
    int64_t a = std::max(lo, std::get<0>(s)), b = std::min(hi, std::get<1>(s));
    if (a >= b) continue;
    if (at < a) fn(at, a, 0.0f);
    fn(a, b, (float)std::get<2>(s));
    at = b;
  }
  if (at < hi) fn(at, hi, 0.0f);
}

HOT double abs_sum(const float* x, int64_t lo, int64_t hi) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = lo; i < hi; ++i) acc += std::fabs(x[i]);
  return acc;
}

inline void or_byte(uint8_t* bits, int64_t byte, uint8_t v) {
  if (v) __atomic_fetch_or(bits + byte, v, __ATOMIC_RELAXED);
}

// Pass 2 on [lo, hi): pack signs of p (read from src) and, when err is given, err = p -/+ scale.
HOT void pack_signs(const float* src, uint8_t* bits, int64_t lo, int64_t hi) {
  int64_t i = lo;
  uint8_t head = 0;
  for (; i < hi && (i & 7); ++i) head |= (uint8_t)(src[i] >= 0.0f) << (i & 7);
  if (lo & 7) or_byte(bits, lo >> 3, head);
  for (; i + 8 <= hi; i += 8) {
    uint8_t byte = 0;
    for (int k = 0; k < 8; ++k) byte |= (uint8_t)(src[i + k] >= 0.0f) << k;
    bits[i >> 3] = byte;
  }
  uint8_t tail = 0;
  const int64_t tail_start = i;
  for (; i < hi; ++i) tail |= (uint8_t)(src[i] >= 0.0f) << (i & 7);
  if (tail_start < hi) or_byte(bits, tail_start >> 3, tail);
}

// e = p - scale*sign(p), with p read from e itself.
HOT void subtract_signs(float* err, int64_t lo, int64_t hi, float scale) {
  for (int64_t i = lo; i < hi; ++i) {
    const float p = err[i];
    err[i] = p - (p >= 0.0f ? scale : -scale);
  }
}

// Pass 2 on [lo, hi): pack the signs of p (read from src) and, when err is given, err = p -/+ scale.
inline void sign_pass(const float* src, float* err, uint8_t* bits, int64_t lo, int64_t hi, float scale) {
  pack_signs(src, bits, lo, hi);
  if (err) subtract_signs(err, lo, hi, scale);  // src == err here: p is still in cache
}

// The shared two-pass engine. pass1(lo, hi, block) returns sum |p| over [lo, hi) and leaves p where
// pass 2 reads it (src); err is updated in pass 2 when non-null.
template <class Pass1>
std::tuple<torch::Tensor, torch::Tensor> two_pass(const Layout& l, int64_t numel, const float* src, float* err,
                                                  Pass1 pass1, const torch::TensorOptions& opts) {
  int64_t nblocks = (int64_t)l.offsets.size() - 1;
  auto scales = torch::zeros({nblocks}, opts.dtype(torch::kFloat32));
  auto bits = torch::zeros({(numel + 7) / 8}, opts.dtype(torch::kUInt8));
  float* s = scales.data_ptr<float>();
  uint8_t* b = bits.data_ptr<uint8_t>();
  std::vector<double> partial(l.tasks.size(), 0.0);
  size_t first = 0;
  for (size_t end : l.round_ends) {
    at::parallel_for(first, end, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) partial[t] = pass1(l.tasks[t].lo, l.tasks[t].hi, l.tasks[t].block);
    });
    for (size_t t = first; t < end;) {  // scales of the blocks of this round
      int64_t blk = l.tasks[t].block;
      double sum = 0.0;
      for (; t < end && l.tasks[t].block == blk; ++t) sum += partial[t];
      float scale = (float)(sum / (double)(l.offsets[blk + 1] - l.offsets[blk]));
      TORCH_CHECK_VALUE(std::isfinite(scale), "blocksign: non-finite values (inf or NaN) in block ", blk,
                        " (elements ", l.offsets[blk], " to ", l.offsets[blk + 1], "); check the gradients");
      s[blk] = scale;
    }
    at::parallel_for(first, end, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) sign_pass(src, err, b, l.tasks[t].lo, l.tasks[t].hi, s[l.tasks[t].block]);
    });
    first = end;
  }
  return {scales, bits};
}

void check_vec(const torch::Tensor& t, const char* what) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.dtype() == torch::kFloat32 && t.dim() == 1 && t.is_contiguous(),
                    what, " must be a contiguous 1-D float32 CPU tensor");
}

void check_payload(const torch::Tensor& scales, const torch::Tensor& bits, const Layout& l, int64_t numel) {
  TORCH_CHECK_VALUE(scales.dtype() == torch::kFloat32 && scales.is_contiguous() &&
                        scales.numel() == (int64_t)l.offsets.size() - 1,
                    "scales must be float32 with one per block");
  TORCH_CHECK_VALUE(bits.dtype() == torch::kUInt8 && bits.is_contiguous() && bits.numel() == (numel + 7) / 8,
                    "bits must be uint8 with ceil(numel/8) bytes");
}


inline float signed_scale(const uint8_t* bits, int64_t i, float scale) {
  return (bits[i >> 3] >> (i & 7)) & 1 ? scale : -scale;
}

// Calls fn(lo, hi, block) in parallel for every task.
template <class F>
void for_each_task(const Layout& l, F fn) {
  at::parallel_for(0, (int64_t)l.tasks.size(), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) fn(l.tasks[t].lo, l.tasks[t].hi, l.tasks[t].block);
  });
}

}  // namespace

namespace {
// p = d + r*e stored in e over [a, b); returns sum |p| (double partial sums: scales as accurate as
// torch's reductions).
HOT double compensate_range(const float* d, float* e, int64_t a, int64_t b, float r) {
  double acc = 0.0;
  if (r == 0.0f) {
#pragma omp simd reduction(+ : acc)
    for (int64_t i = a; i < b; ++i) {
      const float p = d[i];
      e[i] = p;
      acc += std::fabs(p);
    }
  } else {
#pragma omp simd reduction(+ : acc)
    for (int64_t i = a; i < b; ++i) {
      const float t = r * e[i];
      const float p = d[i] + t;
      e[i] = p;
      acc += std::fabs(p);
    }
  }
  return acc;
}

// Pass 1 of an error-feedback step on [lo, hi) with d given as a pointer indexed like e.
double feedback_pass1(const float* d, float* ep, const Segments& segments, int64_t lo, int64_t hi) {
  double total = 0.0;
  for_each_segment(segments, lo, hi,
                   [&](int64_t a, int64_t b, float r) { total += compensate_range(d, ep, a, b, r); });
  return total;
}

struct Payloads {
  std::vector<const float*> scales;
  std::vector<const uint8_t*> bits;
  Payloads(const std::vector<torch::Tensor>& s, const std::vector<torch::Tensor>& b, const Layout& l, int64_t n) {
    TORCH_CHECK_VALUE(!s.empty() && s.size() == b.size(), "need as many scales as bits, at least one");
    for (size_t m = 0; m < s.size(); ++m) {
      check_payload(s[m], b[m], l, n);
      scales.push_back(s[m].data_ptr<float>());
      bits.push_back(b[m].data_ptr<uint8_t>());
    }
  }
  // out[0 .. hi-lo) = (((0 + v_0) + v_1) + ... + v_{M-1}) / M over [lo, hi) of block blk, the order
  // of the torch path; whole bytes of bits are unpacked 8 elements at a time.
  void mean_range(int64_t lo, int64_t hi, int64_t blk, float* out) const {
    const float count = (float)scales.size();
    int64_t i = lo;
    for (; i < hi && (i & 7); ++i) out[i - lo] = mean_at(i, blk) / count;
    for (; i + 8 <= hi; i += 8) {
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (size_t m = 0; m < scales.size(); ++m) {
        const float* sign = kSigns.v[bits[m][i >> 3]];
        const float sc = scales[m][blk];
        for (int k = 0; k < 8; ++k) acc[k] += sign[k] * sc;  // ±1 · s is exact
      }
      for (int k = 0; k < 8; ++k) out[i - lo + k] = acc[k] / count;
    }
    for (; i < hi; ++i) out[i - lo] = mean_at(i, blk) / count;
  }
  inline float mean_at(int64_t i, int64_t blk) const {
    float acc = 0.0f;
    for (size_t m = 0; m < scales.size(); ++m) acc += signed_scale(bits[m], i, scales[m][blk]);
    return acc;
  }
};
}  // namespace

// p = d + r*e (r per segment); (scales, bits) = C(p); e <- p - C(p). Two passes over memory.
std::tuple<torch::Tensor, torch::Tensor> blocksign_feedback(torch::Tensor d, torch::Tensor error,
                                                            std::vector<int64_t> block_sizes, Segments segments) {
  check_vec(d, "d");
  check_vec(error, "error");
  TORCH_CHECK_VALUE(d.numel() == error.numel(), "d and error differ in length");
  int64_t n = d.numel();
  Layout l = make_layout(block_sizes, n);
  const float* dp = d.data_ptr<float>();
  float* ep = error.data_ptr<float>();
  auto pass1 = [&](int64_t lo, int64_t hi, int64_t) {
    return feedback_pass1(dp, ep, segments, lo, hi);
  };
  return two_pass(l, n, ep, ep, pass1, d.options());
}

// (scales, bits) of x, without error feedback.
std::tuple<torch::Tensor, torch::Tensor> blocksign_compress(torch::Tensor x, std::vector<int64_t> block_sizes) {
  check_vec(x, "x");
  int64_t n = x.numel();
  Layout l = make_layout(block_sizes, n);
  const float* xp = x.data_ptr<float>();
  auto pass1 = [&](int64_t lo, int64_t hi, int64_t) { return abs_sum(xp, lo, hi); };
  return two_pass(l, n, xp, nullptr, pass1, x.options());
}

// (1/M) * sum of M decompressed payloads: the server's first line.
// ``out``, when given, is written instead of a new tensor (saves a page-faulting allocation per step).
torch::Tensor blocksign_decompress_mean(std::vector<torch::Tensor> scales, std::vector<torch::Tensor> bits,
                                        std::vector<int64_t> block_sizes, int64_t numel,
                                        c10::optional<torch::Tensor> out_) {
  Layout l = make_layout(block_sizes, numel);
  Payloads in(scales, bits, l, numel);
  torch::Tensor out = out_.has_value() ? *out_ : torch::empty({numel}, torch::dtype(torch::kFloat32));
  check_vec(out, "out");
  TORCH_CHECK_VALUE(out.numel() == numel, "out has ", out.numel(), " elements, expected ", numel);
  float* o = out.data_ptr<float>();
  for_each_task(l, [&](int64_t lo, int64_t hi, int64_t blk) { in.mean_range(lo, hi, blk, o + lo); });
  return out;
}

// scale_b * sign as a float32 vector.
torch::Tensor blocksign_decompress(torch::Tensor scales, torch::Tensor bits, std::vector<int64_t> block_sizes,
                                   int64_t numel, c10::optional<torch::Tensor> out) {
  return blocksign_decompress_mean({scales}, {bits}, block_sizes, numel, out);
}

// The server step fused: p = (1/M)*sum_i C_i + r*e; (scales, bits) = C(p); e <- p - C(p),
// without materialising the mean.
std::tuple<torch::Tensor, torch::Tensor> blocksign_server_feedback(std::vector<torch::Tensor> scales,
                                                                   std::vector<torch::Tensor> bits,
                                                                   torch::Tensor error,
                                                                   std::vector<int64_t> block_sizes,
                                                                   Segments segments) {
  check_vec(error, "error");
  int64_t n = error.numel();
  Layout l = make_layout(block_sizes, n);
  Payloads in(scales, bits, l, n);
  float* ep = error.data_ptr<float>();
  auto pass1 = [&](int64_t lo, int64_t hi, int64_t blk) {
    thread_local std::vector<float> mean;  // one task's mean, still in cache for pass 1
    mean.resize(kChunk);
    in.mean_range(lo, hi, blk, mean.data());
    return feedback_pass1(mean.data() - lo, ep, segments, lo, hi);
  };
  return two_pass(l, n, ep, ep, pass1, error.options());
}

// Packed signs of x (bit set where x >= 0), without scales: signum's message.
torch::Tensor pack_signs(torch::Tensor x) {
  check_vec(x, "x");
  const int64_t n = x.numel();
  auto bits = torch::zeros({(n + 7) / 8}, x.options().dtype(torch::kUInt8));
  const float* xp = x.data_ptr<float>();
  uint8_t* b = bits.data_ptr<uint8_t>();
  at::parallel_for(0, (n + 7) / 8, kChunk / 8, [&](int64_t lo, int64_t hi) {
    pack_signs(xp, b, lo * 8, std::min(hi * 8, n));  // whole bytes per task: no byte is shared
  });
  return bits;
}
