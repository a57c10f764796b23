// Error-feedback passes for the dense and generic compressors (SPEC §1, §2), in one pass over memory
// with no temporary vector: the compensation p = d + r*e of every compressor's generic step, and the
// whole error step of fp16. hvd_distef/_torch_kernels.py holds the reference of each (same
// signature, same bits): the product r*e rounds before the sum (-ffp-contract=off), r is the float
// of the segment's ratio (as torch's multiplication by a Python float), ratio 0 copies d.
#include "kernels.h"

#include <ATen/Parallel.h>

#ifdef HVD_DISTEF_X86_GCC
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t kGrain = 1 << 15;

void check_vec(const at::Tensor& t, const char* what) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.dtype() == at::kFloat && t.dim() == 1 && t.is_contiguous(), what,
                    " must be a contiguous 1-D float32 CPU tensor");
}

// fn(a, b, r) over the parts of [lo, hi) covered by each segment, r = 0 elsewhere (as the torch path).
template <class F>
void for_each_segment(const Segments& segs, int64_t lo, int64_t hi, F fn) {
  int64_t at = lo;
  for (const auto& s : segs) {
    const int64_t a = std::max(at, std::get<0>(s)), b = std::min(hi, std::get<1>(s));
    if (a >= b) continue;
    if (at < a) fn(at, a, 0.0f);
    fn(a, b, (float)std::get<2>(s));
    at = b;
  }
  if (at < hi) fn(at, hi, 0.0f);
}

// p = d + r*e over [a, b) into p (which may be d).
HOT void compensate_range(const float* d, const float* e, float* p, int64_t a, int64_t b, float r) {
  if (r == 0.0f) {
    if (p != d) std::copy(d + a, d + b, p + a);
    return;
  }
  for (int64_t i = a; i < b; ++i) {
    const float t = r * e[i];
    p[i] = d[i] + t;
  }
}

// float16 bits of x saturated at ±max (x is first clamped; NaN stays NaN), rounded to nearest even.
inline uint16_t to_half(float x, float max) {
  const float c = std::min(std::max(x, -max), max);
  return c10::Half(c).x;
}

// Where the vector to compress comes from: d itself (float32), or the mean of M float16 payloads,
// ((h_0 + h_1) + ... + h_{M-1}) / M in float32 (one payload: h_0, x/1 = x), as
// Compressor.decompress_mean sums them.
struct Source {
  const float* d = nullptr;
  std::vector<const uint16_t*> halves;
  float at(int64_t i) const {
    if (d) return d[i];
    float acc = half_to_float(halves[0][i]);
    for (size_t m = 1; m < halves.size(); ++m) acc = acc + half_to_float(halves[m][i]);
    return halves.size() > 1 ? acc / (float)halves.size() : acc;
  }
  static float half_to_float(uint16_t x) {
    c10::Half h;
    h.x = x;
    return (float)h;
  }
};

// p = source + r*e; h = float16(p) saturated; e = p - float(h), over [a, b), scalar.
void half_range_scalar(const Source& src, float* e, uint16_t* h, int64_t a, int64_t b, float r, float max) {
  for (int64_t i = a; i < b; ++i) {
    const float v = src.at(i);
    const float p = r == 0.0f ? v : v + r * e[i];
    const uint16_t hi = to_half(p, max);
    h[i] = hi;
    e[i] = p - Source::half_to_float(hi);
  }
}

#ifdef HVD_DISTEF_X86_GCC
// The same with F16C, 8 elements per step: _mm256_cvtps_ph rounds to nearest even, as c10::Half
// does, and half -> float is exact. Returns where it stopped.
__attribute__((target("avx2,f16c"))) int64_t half_range_f16c(const Source& src, float* e, uint16_t* h, int64_t a,
                                                             int64_t b, float r, float max) {
  const __m256 rv = _mm256_set1_ps(r), hi = _mm256_set1_ps(max), lo = _mm256_set1_ps(-max);
  const __m256 count = _mm256_set1_ps((float)src.halves.size());
  int64_t i = a;
  for (; i + 8 <= b; i += 8) {
    __m256 p;
    if (src.d) {
      p = _mm256_loadu_ps(src.d + i);
    } else {
      p = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src.halves[0] + i)));
      for (size_t m = 1; m < src.halves.size(); ++m)
        p = _mm256_add_ps(p, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src.halves[m] + i))));
      if (src.halves.size() > 1) p = _mm256_div_ps(p, count);
    }
    if (r != 0.0f) p = _mm256_add_ps(p, _mm256_mul_ps(rv, _mm256_loadu_ps(e + i)));
    // MAXPS/MINPS return their second operand when either is NaN: x goes second to stay NaN
    const __m256 c = _mm256_min_ps(hi, _mm256_max_ps(lo, p));
    const __m128i half = _mm256_cvtps_ph(c, _MM_FROUND_TO_NEAREST_INT);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(h + i), half);
    _mm256_storeu_ps(e + i, _mm256_sub_ps(p, _mm256_cvtph_ps(half)));
  }
  return i;
}
const bool kF16c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
#endif

void half_range(const Source& src, float* e, uint16_t* h, int64_t a, int64_t b, float r, float max) {
#ifdef HVD_DISTEF_X86_GCC
  if (kF16c) a = half_range_f16c(src, e, h, a, b, r, max);
#endif
  half_range_scalar(src, e, h, a, b, r, max);
}

}  // namespace

at::Tensor compensate(at::Tensor d, at::Tensor error, Segments segments, c10::optional<at::Tensor> out_) {
  check_vec(d, "d");
  check_vec(error, "error");
  const int64_t n = d.numel();
  TORCH_CHECK_VALUE(error.numel() == n, "d and error differ in length");
  at::Tensor out = out_.has_value() ? *out_ : at::empty({n}, d.options());
  check_vec(out, "out");
  TORCH_CHECK_VALUE(out.numel() == n, "out differs in length from d");
  const float* dp = d.data_ptr<float>();
  const float* ep = error.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
    for_each_segment(segments, lo, hi, [&](int64_t a, int64_t b, float r) { compensate_range(dp, ep, op, a, b, r); });
  });
  return out;
}

at::Tensor half_feedback(std::vector<at::Tensor> sources, at::Tensor error, Segments segments, double max_value,
                         c10::optional<at::Tensor> out_) {
  check_vec(error, "error");
  const int64_t n = error.numel();
  TORCH_CHECK_VALUE(!sources.empty(), "half_feedback needs d or at least one float16 payload");
  Source src;
  for (const auto& t : sources) {
    TORCH_CHECK_VALUE(t.device().is_cpu() && t.is_contiguous() && t.numel() == n, "every source must be a contiguous ",
                      "CPU vector of the error's length");
    if (t.dtype() == at::kFloat) {
      TORCH_CHECK_VALUE(sources.size() == 1, "give one float32 d or float16 payloads");
      src.d = t.data_ptr<float>();
    } else {
      TORCH_CHECK_VALUE(t.dtype() == at::kHalf, "sources must be float32 (d) or float16 (payloads)");
      src.halves.push_back(reinterpret_cast<const uint16_t*>(t.data_ptr<at::Half>()));
    }
  }
  at::Tensor out = out_.has_value() ? *out_ : at::empty({n}, error.options().dtype(at::kHalf));
  TORCH_CHECK_VALUE(out.device().is_cpu() && out.dtype() == at::kHalf && out.is_contiguous() && out.numel() == n,
                    "out must be a contiguous float16 CPU vector of the error's length");
  float* ep = error.data_ptr<float>();
  uint16_t* hp = reinterpret_cast<uint16_t*>(out.data_ptr<at::Half>());
  const float max = (float)max_value;
  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
    for_each_segment(segments, lo, hi, [&](int64_t a, int64_t b, float r) { half_range(src, ep, hp, a, b, r, max); });
  });
  return out;
}
