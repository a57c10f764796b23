// Fused CPU kernels for blockwise scaled sign with error feedback (SPEC §1, §2).
//
// Same signatures, bit order and results as hvd_distef/_torch_kernels.py: sign bits packed 8 per
// byte, element i -> bit i%8 of byte i/8, bit set where x >= 0 (sign(0) = +1, also for -0.0).
// Packed bits are identical to the torch path; scales agree to float rounding (the L1 sums are
// accumulated in another order). Built with -ffp-contract=off so that p = d + r*e rounds the
// product before the sum, exactly as the torch path does.
//
// One pass over memory. The sign of p needs no scale, and the scale of a block needs all of the
// block, so the error step defers its last line: it leaves p itself in the error buffer and
// returns the payload C(p); the next step (or ErrorMemory when someone reads the error) first
// subtracts C(p) from the buffer, giving e = p - C(p) bit for bit. Work is cut into tasks of at
// most kChunk elements within a block; each task settles, compensates, sums |p| and packs signs
// while its slice is in cache, so the step moves ~12 bytes per element (read d and e, write e).
// Bytes of bits shared by two tasks are OR-ed atomically.
#include "kernels.h"

#include <ATen/Parallel.h>

#ifdef HVD_DISTEF_X86_GCC
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 15;

struct Task {
  int64_t block, lo, hi;
};

struct Layout {
  std::vector<int64_t> offsets;  // block b spans [offsets[b], offsets[b+1])
  std::vector<Task> tasks;
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
  for (size_t b = 0; b < block_sizes.size(); ++b)
    for (int64_t lo = l.offsets[b]; lo < l.offsets[b + 1]; lo += kChunk)
      l.tasks.push_back({(int64_t)b, lo, std::min(lo + kChunk, l.offsets[b + 1])});
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

// Whole bytes of sign bits from i (a multiple of 8) while 8 elements remain; returns where it
// stopped. Portable: GCC does not vectorise the bit assembly (about 2x slower than the AVX2 twin).
int64_t pack_whole_bytes(const float* src, uint8_t* bits, int64_t i, int64_t hi) {
  for (; i + 8 <= hi; i += 8) {
    uint8_t byte = 0;
    for (int k = 0; k < 8; ++k) byte |= (uint8_t)(src[i + k] >= 0.0f) << k;
    bits[i >> 3] = byte;
  }
  return i;
}

#ifdef HVD_DISTEF_X86_GCC
// The same bytes with AVX2: one ordered x >= 0 compare (false for NaN, true for -0.0, as above) and
// a movemask per 8 elements.
__attribute__((target("avx2"))) int64_t pack_whole_bytes_avx2(const float* src, uint8_t* bits, int64_t i,
                                                               int64_t hi) {
  const __m256 zero = _mm256_setzero_ps();
  for (; i + 8 <= hi; i += 8)
    bits[i >> 3] = (uint8_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(src + i), zero, _CMP_GE_OQ));
  return i;
}
const bool kAvx2 = __builtin_cpu_supports("avx2");
#endif

// Packs the signs of src over [lo, hi) into bits (zeros on entry).
void pack_sign_bits(const float* src, uint8_t* bits, int64_t lo, int64_t hi) {
  int64_t i = lo;
  uint8_t head = 0;
  for (; i < hi && (i & 7); ++i) head |= (uint8_t)(src[i] >= 0.0f) << (i & 7);
  if (lo & 7) or_byte(bits, lo >> 3, head);
#ifdef HVD_DISTEF_X86_GCC
  i = kAvx2 ? pack_whole_bytes_avx2(src, bits, i, hi) : pack_whole_bytes(src, bits, i, hi);
#else
  i = pack_whole_bytes(src, bits, i, hi);
#endif
  uint8_t tail = 0;
  const int64_t tail_start = i;
  for (; i < hi; ++i) tail |= (uint8_t)(src[i] >= 0.0f) << (i & 7);
  if (tail_start < hi) or_byte(bits, tail_start >> 3, tail);
}

inline float signed_scale(const uint8_t* bits, int64_t i, float scale) {
  return (bits[i >> 3] >> (i & 7)) & 1 ? scale : -scale;
}

// p = d + r*e_in stored in e_out over [a, b) (e_out may be e_in: in place); returns sum |p| (double
// partial sums: scales as accurate as torch's reductions).
HOT double compensate_range(const float* d, const float* e_in, float* e_out, int64_t a, int64_t b, float r) {
  double acc = 0.0;
  if (r == 0.0f) {
#pragma omp simd reduction(+ : acc)
    for (int64_t i = a; i < b; ++i) {
      const float p = d[i];
      e_out[i] = p;
      acc += std::fabs(p);
    }
  } else {
#pragma omp simd reduction(+ : acc)
    for (int64_t i = a; i < b; ++i) {
      const float t = r * e_in[i];
      const float p = d[i] + t;
      e_out[i] = p;
      acc += std::fabs(p);
    }
  }
  return acc;
}

// e_out <- d + r*(e_in - scale*sign_prev) over [a, b) of one block, in one sweep: the previous step's
// deferred e = p - (±scale) (as the torch path computes it; ±1 · s is exact), then this step's
// p = d + r*e. e_out may be e_in. Returns sum |p|.
HOT double settle_compensate_range(const float* d, const float* e_in, float* e_out, const uint8_t* bits, float scale,
                                   int64_t a, int64_t b, float r) {
  double acc = 0.0;
  int64_t i = a;
  auto one = [&](int64_t j) {
    const float t = r * (e_in[j] - signed_scale(bits, j, scale));
    const float p = d[j] + t;
    e_out[j] = p;
    acc += std::fabs(p);
  };
  for (; i < b && (i & 7); ++i) one(i);
  for (; i + 8 <= b; i += 8) {
    const float* sign = kSigns.v[bits[i >> 3]];
    double part = 0.0;
#pragma omp simd reduction(+ : part)
    for (int k = 0; k < 8; ++k) {
      const float t = r * (e_in[i + k] - sign[k] * scale);
      const float p = d[i + k] + t;
      e_out[i + k] = p;
      part += std::fabs(p);
    }
    acc += part;
  }
  for (; i < b; ++i) one(i);
  return acc;
}

void check_vec(const at::Tensor& t, const char* what) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.dtype() == at::kFloat && t.dim() == 1 && t.is_contiguous(),
                    what, " must be a contiguous 1-D float32 CPU tensor");
}

void check_payload(const at::Tensor& scales, const at::Tensor& bits, const Layout& l, int64_t numel) {
  TORCH_CHECK_VALUE(scales.dtype() == at::kFloat && scales.is_contiguous() &&
                        scales.numel() == (int64_t)l.offsets.size() - 1,
                    "scales must be float32 with one per block");
  TORCH_CHECK_VALUE(bits.dtype() == at::kByte && bits.is_contiguous() && bits.numel() == (numel + 7) / 8,
                    "bits must be uint8 with ceil(numel/8) bytes");
}

// out[0 .. hi-lo) = 0 + (±scale) over [lo, hi): one payload's decompression, (0 + v) / 1 without the
// division (exact); whole bytes of bits are unpacked 8 elements at a time (out may not alias the sign
// table: __restrict__ lets GCC vectorise the 8, 3.5x faster).
HOT void decompress_range(const uint8_t* bits, float scale, int64_t lo, int64_t hi, float* __restrict__ out) {
  int64_t i = lo;
  for (; i < hi && (i & 7); ++i) out[i - lo] = 0.0f + signed_scale(bits, i, scale);
  for (; i + 8 <= hi; i += 8) {
    const float* sign = kSigns.v[bits[i >> 3]];
    for (int k = 0; k < 8; ++k) out[i - lo + k] = 0.0f + sign[k] * scale;  // ±1 · s is exact
  }
  for (; i < hi; ++i) out[i - lo] = 0.0f + signed_scale(bits, i, scale);
}

// out[0 .. hi-lo) = (((0 + v_0) + v_1) + ... + v_{M-1}) / M over [lo, hi) of block blk, M payloads.
HOT void mean_of_range(const std::vector<const float*>& scales, const std::vector<const uint8_t*>& bits, int64_t blk,
                       int64_t lo, int64_t hi, float* __restrict__ out) {
  const float count = (float)scales.size();
  auto mean_at = [&](int64_t i) {
    float acc = 0.0f;
    for (size_t m = 0; m < scales.size(); ++m) acc += signed_scale(bits[m], i, scales[m][blk]);
    return acc / count;
  };
  int64_t i = lo;
  for (; i < hi && (i & 7); ++i) out[i - lo] = mean_at(i);
  for (; i + 8 <= hi; i += 8) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (size_t m = 0; m < scales.size(); ++m) {
      const float* sign = kSigns.v[bits[m][i >> 3]];
      const float sc = scales[m][blk];
      for (int k = 0; k < 8; ++k) acc[k] += sign[k] * sc;  // ±1 · s is exact
    }
    for (int k = 0; k < 8; ++k) out[i - lo + k] = acc[k] / count;
  }
  for (; i < hi; ++i) out[i - lo] = mean_at(i);
}

struct Payloads {
  std::vector<const float*> scales;
  std::vector<const uint8_t*> bits;
  Payloads(const std::vector<at::Tensor>& s, const std::vector<at::Tensor>& b, const Layout& l, int64_t n) {
    TORCH_CHECK_VALUE(s.size() == b.size(), "need as many scales as bits");
    for (size_t m = 0; m < s.size(); ++m) {
      check_payload(s[m], b[m], l, n);
      scales.push_back(s[m].data_ptr<float>());
      bits.push_back(b[m].data_ptr<uint8_t>());
    }
  }
  // out[0 .. hi-lo) = (((0 + v_0) + v_1) + ... + v_{M-1}) / M over [lo, hi) of block blk, the order
  // of the torch path.
  void mean_range(int64_t lo, int64_t hi, int64_t blk, float* out) const {
    if (scales.size() == 1)
      decompress_range(bits[0], scales[0][blk], lo, hi, out);
    else
      mean_of_range(scales, bits, blk, lo, hi, out);
  }
};

// The one pass shared by every kernel: per task, sum = task_pass(lo, hi, block) leaves the
// vector to compress in src[lo, hi) and returns its L1 norm there; the signs are packed while
// the slice is in cache. Then the block scales: a non-finite one raises ValueError, or with
// ``finite`` given, sets *finite to false (its caller discards the payload). Returns (scales, bits).
template <class TaskPass>
std::tuple<at::Tensor, at::Tensor> one_pass(const Layout& l, int64_t numel, const float* src,
                                                  TaskPass task_pass, const at::TensorOptions& opts,
                                                  bool* finite = nullptr) {
  const int64_t nblocks = (int64_t)l.offsets.size() - 1;
  auto scales = at::zeros({nblocks}, opts.dtype(at::kFloat));
  auto bits = at::zeros({(numel + 7) / 8}, opts.dtype(at::kByte));
  float* s = scales.data_ptr<float>();
  uint8_t* b = bits.data_ptr<uint8_t>();
  std::vector<double> partial(l.tasks.size(), 0.0);
  at::parallel_for(0, (int64_t)l.tasks.size(), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const Task& task = l.tasks[t];
      partial[t] = task_pass(task.lo, task.hi, task.block);
      pack_sign_bits(src, b, task.lo, task.hi);
    }
  });
  for (size_t t = 0; t < l.tasks.size();) {
    const int64_t blk = l.tasks[t].block;
    double sum = 0.0;
    for (; t < l.tasks.size() && l.tasks[t].block == blk; ++t) sum += partial[t];
    const float scale = (float)(sum / (double)(l.offsets[blk + 1] - l.offsets[blk]));
    if (finite != nullptr && !std::isfinite(scale)) *finite = false;
    TORCH_CHECK_VALUE(finite != nullptr || std::isfinite(scale), "blocksign: non-finite values (inf or NaN) in block ",
                      blk, " (elements ", l.offsets[blk], " to ", l.offsets[blk + 1], "); check the gradients");
    s[blk] = scale;
  }
  return {scales, bits};
}

// The error steps' task: settle the deferred correction (prev), then p = d + r*e, e read from e_in
// and p written to e_out (the same buffer, but for the worker's step ahead).
struct FeedbackTask {
  const float* e_in;
  float* e_out;
  const Segments& segments;
  const float* prev_scales = nullptr;
  const uint8_t* prev_bits = nullptr;
  double operator()(const float* d, int64_t lo, int64_t hi, int64_t blk) const {
    double total = 0.0;
    for_each_segment(segments, lo, hi, [&](int64_t a, int64_t b, float r) {
      // with r = 0 the error is not read: nothing to settle
      total += prev_bits && r != 0.0f ? settle_compensate_range(d, e_in, e_out, prev_bits, prev_scales[blk], a, b, r)
                                      : compensate_range(d, e_in, e_out, a, b, r);
    });
    return total;
  }
};

FeedbackTask feedback_task(const at::Tensor& error, const at::Tensor& error_out, const Segments& segments,
                           const c10::optional<at::Tensor>& prev_scales, const c10::optional<at::Tensor>& prev_bits,
                           const Layout& l) {
  check_vec(error, "error");
  check_vec(error_out, "error_out");
  TORCH_CHECK_VALUE(error_out.numel() == error.numel(), "error and error_out differ in length");
  FeedbackTask task{error.data_ptr<float>(), error_out.data_ptr<float>(), segments};
  TORCH_CHECK_VALUE(prev_scales.has_value() == prev_bits.has_value(), "give both prev_scales and prev_bits, or neither");
  if (prev_bits.has_value()) {
    check_payload(*prev_scales, *prev_bits, l, error.numel());
    task.prev_scales = prev_scales->data_ptr<float>();
    task.prev_bits = prev_bits->data_ptr<uint8_t>();
  }
  return task;
}

}  // namespace

struct BlocksignPieces::Piece {
  int64_t start;
  Layout layout;
  Payloads payload;
};

BlocksignPieces::BlocksignPieces(const std::vector<int64_t>& starts, const std::vector<at::Tensor>& scales,
                                 const std::vector<at::Tensor>& bits,
                                 const std::vector<std::vector<int64_t>>& block_sizes, int64_t n) {
  TORCH_CHECK_VALUE(starts.size() == scales.size() && starts.size() == bits.size() &&
                        starts.size() == block_sizes.size(),
                    "one start, scales, bits and block sizes per piece");
  int64_t covered = 0;  // the pieces, in order, leave no gap in [0, n)
  for (size_t k = 0; k < starts.size(); ++k) {
    int64_t numel = 0;
    for (int64_t b : block_sizes[k]) numel += b;
    TORCH_CHECK_VALUE(starts[k] <= covered, "piece ", k, " starts at ", starts[k], ", leaving elements from ",
                      covered, " without a payload");
    Layout layout = make_layout(block_sizes[k], numel);
    Payloads payload({scales[k]}, {bits[k]}, layout, numel);
    pieces_.push_back(std::make_unique<Piece>(Piece{starts[k], std::move(layout), std::move(payload)}));
    covered = std::max(covered, starts[k] + numel);
  }
  TORCH_CHECK_VALUE(covered >= n, "the pieces cover ", covered, " of ", n, " elements");
}

BlocksignPieces::~BlocksignPieces() = default;

void BlocksignPieces::fill(int64_t lo, int64_t hi, float* out) const {
  for (const auto& piece : pieces_) {
    const std::vector<int64_t>& offsets = piece->layout.offsets;
    int64_t a = std::max(lo, piece->start) - piece->start, b = std::min(hi, piece->start + offsets.back()) - piece->start;
    if (a >= b) continue;
    int64_t blk = std::upper_bound(offsets.begin(), offsets.end(), a) - offsets.begin() - 1;
    for (; a < b; ++blk) {
      const int64_t end = std::min(b, offsets[blk + 1]);
      piece->payload.mean_range(a, end, blk, out + (a + piece->start - lo));  // one payload: its decompression
      a = end;
    }
  }
}

// p = d + r*(e - C_prev) (r per segment; C_prev the deferred payload when given); p left in error;
// returns C(p), whose subtraction from error is deferred.
std::tuple<at::Tensor, at::Tensor> blocksign_feedback(at::Tensor d, at::Tensor error,
                                                            std::vector<int64_t> block_sizes, Segments segments,
                                                            c10::optional<at::Tensor> prev_scales,
                                                            c10::optional<at::Tensor> prev_bits) {
  check_vec(d, "d");
  TORCH_CHECK_VALUE(d.numel() == error.numel(), "d and error differ in length");
  const int64_t n = d.numel();
  const Layout l = make_layout(block_sizes, n);
  const FeedbackTask task = feedback_task(error, error, segments, prev_scales, prev_bits, l);
  const float* dp = d.data_ptr<float>();
  return one_pass(l, n, task.e_out, [&](int64_t lo, int64_t hi, int64_t blk) { return task(dp, lo, hi, blk); },
                  d.options());
}

// The worker's side of SPEC §1 on one shard in one pass over memory: per task, the momentum
// (Gradients::momentum: g read where backward left it, times inv_scale; m' = mu*m + g into
// momentum_out; d = g + mu*m' or m') into a per-thread slice that stays in cache, then
// blocksign_feedback's step on it with e read from ``error`` (C_prev settled) and p written to
// ``error_out``. Element i of the shard is element offset + i of the gradients end to end (an
// empty one: zeros), each with its group's mu and nesterov; the four buffers are the shard's slices.
// Writes only momentum_out and error_out: the step can still be dropped. Returns (scales, bits,
// usable): usable is false where a gradient element (times inv_scale) or a block scale is not
// finite, and the payload is then meaningless.
std::tuple<at::Tensor, at::Tensor, bool> worker_blocksign_feedback(const Grads& grads, const Momentum& momentum,
                                                                   const Feedback& feedback) {
  const at::Tensor& error = feedback.error;
  const int64_t n = error.numel(), offset = feedback.start;
  check_vec(momentum.current, "momentum");
  check_vec(momentum.next, "momentum_out");
  TORCH_CHECK_VALUE(momentum.current.numel() == n && momentum.next.numel() == n,
                    "the momentum buffers must have the error's length");
  const Gradients gradients(grads.grads, grads.sizes, momentum.mus, momentum.nesterovs);
  TORCH_CHECK_VALUE(offset >= 0 && offset + n <= gradients.numel(), "the shard [", offset, ", ", offset + n,
                    ") lies outside the gradients' ", gradients.numel(), " elements");
  const Layout l = make_layout(feedback.block_sizes, n);
  const FeedbackTask task = feedback_task(error, feedback.error_out, feedback.segments, feedback.prev_scales,
                                          feedback.prev_bits, l);
  const float* m_in = momentum.current.data_ptr<float>();
  float* m_out = momentum.next.data_ptr<float>();
  const float s = grads.inv_scale.has_value() ? (float)*grads.inv_scale : 1.0f;
  std::atomic<bool> nonfinite{false};
  bool finite = true;
  auto payload = one_pass(
      l, n, task.e_out,
      [&](int64_t lo, int64_t hi, int64_t blk) {
        thread_local std::vector<float> slice;  // this task's d, in cache for the error step
        slice.resize(kChunk);
        if (gradients.momentum(offset + lo, offset + hi, slice.data(), m_in + lo, m_out + lo, s))
          nonfinite.store(true, std::memory_order_relaxed);
        return task(slice.data() - lo, lo, hi, blk);
      },
      error.options(), &finite);
  return {std::get<0>(payload), std::get<1>(payload), finite && !nonfinite.load()};
}

// The server step, likewise: p = (1/M)*sum_i C_i + r*(e - C_prev), without materialising the mean.
std::tuple<at::Tensor, at::Tensor> blocksign_server_feedback(
    std::vector<at::Tensor> scales, std::vector<at::Tensor> bits, at::Tensor error,
    std::vector<int64_t> block_sizes, Segments segments, c10::optional<at::Tensor> prev_scales,
    c10::optional<at::Tensor> prev_bits) {
  const int64_t n = error.numel();
  const Layout l = make_layout(block_sizes, n);
  const Payloads in(scales, bits, l, n);
  TORCH_CHECK_VALUE(!in.scales.empty(), "the server step needs at least one payload");
  const FeedbackTask task = feedback_task(error, error, segments, prev_scales, prev_bits, l);
  return one_pass(
      l, n, task.e_out,
      [&](int64_t lo, int64_t hi, int64_t blk) {
        thread_local std::vector<float> mean;  // one task's mean, in cache for the rest of the task
        mean.resize(kChunk);
        in.mean_range(lo, hi, blk, mean.data());
        return task(mean.data() - lo, lo, hi, blk);
      },
      error.options());
}

// (scales, bits) of x, without error feedback.
std::tuple<at::Tensor, at::Tensor> blocksign_compress(at::Tensor x, std::vector<int64_t> block_sizes) {
  check_vec(x, "x");
  const int64_t n = x.numel();
  const Layout l = make_layout(block_sizes, n);
  const float* xp = x.data_ptr<float>();
  return one_pass(l, n, xp, [&](int64_t lo, int64_t hi, int64_t) { return abs_sum(xp, lo, hi); }, x.options());
}

// (1/M) * sum of M decompressed payloads: the server's first line.
// ``out``, when given, is written instead of a new tensor (saves a page-faulting allocation per step).
at::Tensor blocksign_decompress_mean(std::vector<at::Tensor> scales, std::vector<at::Tensor> bits,
                                        std::vector<int64_t> block_sizes, int64_t numel,
                                        c10::optional<at::Tensor> out_) {
  const Layout l = make_layout(block_sizes, numel);
  const Payloads in(scales, bits, l, numel);
  TORCH_CHECK_VALUE(!in.scales.empty(), "need at least one payload");
  at::Tensor out = out_.has_value() ? *out_ : at::empty({numel}, at::dtype(at::kFloat));
  check_vec(out, "out");
  TORCH_CHECK_VALUE(out.numel() == numel, "out has ", out.numel(), " elements, expected ", numel);
  float* o = out.data_ptr<float>();
  at::parallel_for(0, (int64_t)l.tasks.size(), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) in.mean_range(l.tasks[t].lo, l.tasks[t].hi, l.tasks[t].block, o + l.tasks[t].lo);
  });
  return out;
}

// scale_b * sign as a float32 vector.
at::Tensor blocksign_decompress(at::Tensor scales, at::Tensor bits, std::vector<int64_t> block_sizes,
                                   int64_t numel, c10::optional<at::Tensor> out) {
  return blocksign_decompress_mean({scales}, {bits}, block_sizes, numel, out);
}

// Packed signs of x (bit set where x >= 0), without scales: signum's message.
at::Tensor pack_signs(at::Tensor x) {
  check_vec(x, "x");
  const int64_t n = x.numel();
  auto bits = at::zeros({(n + 7) / 8}, x.options().dtype(at::kByte));
  const float* xp = x.data_ptr<float>();
  uint8_t* b = bits.data_ptr<uint8_t>();
  at::parallel_for(0, (n + 7) / 8, kChunk / 8, [&](int64_t lo, int64_t hi) {
    pack_sign_bits(xp, b, lo * 8, std::min(hi * 8, n));  // whole bytes per task: no byte is shared
  });
  return bits;
}
