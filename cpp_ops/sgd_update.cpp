// The optimizer's element-wise passes around the exchange (SPEC §1), each fused into one pass over
// memory: the momentum before compression, and weight decay plus the descent after it. The torch
// path (hvd_distef/_torch_kernels.py) runs the same float operations in the same order, several
// passes each; built with -ffp-contract=off, so the products round before the sums there too.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kGrain = 1 << 15;

// 1 when x is an inf or a NaN (all exponent bits set), else 0.
inline uint32_t nonfinite_bit(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return (u & 0x7f800000u) == 0x7f800000u;
}

void check_flat(const at::Tensor& t, const char* what) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.dtype() == at::kFloat && t.is_contiguous(), what,
                    " must be a contiguous float32 CPU tensor");
}

// Over n elements of one parameter: gi = g*s (s: AMP's inverse loss scale, or 1: exact) or +0.0
// without a gradient (g null); m_out = mu*m_in + gi; d = gi + mu*m_out (nesterov) or m_out; with
// mu = 0, d = gi and m_out = m_in. Returns whether some gi is not finite (an OR of exponent tests:
// no loop-carried float sum, so the loops vectorise). m_in and m_out may be the same buffer.
HOT bool gather_momentum_range(const float* __restrict__ g, float* __restrict__ d, const float* m_in, float* m_out,
                               int64_t n, float mu, bool nesterov, float s) {
  if (g == nullptr) {
    for (int64_t i = 0; i < n; ++i) {
      const float mi = mu == 0.0f ? m_in[i] : m_in[i] * mu + 0.0f;
      m_out[i] = mi;
      d[i] = mu == 0.0f ? 0.0f : nesterov ? 0.0f + mi * mu : mi;
    }
    return false;
  }
  uint32_t bad = 0;
  if (mu == 0.0f) {
    for (int64_t i = 0; i < n; ++i) {
      const float gi = g[i] * s;
      bad |= nonfinite_bit(gi);
      m_out[i] = m_in[i];
      d[i] = gi;
    }
  } else if (nesterov) {
    for (int64_t i = 0; i < n; ++i) {
      const float gi = g[i] * s;
      bad |= nonfinite_bit(gi);
      const float mi = m_in[i] * mu + gi;
      m_out[i] = mi;
      d[i] = gi + mi * mu;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float gi = g[i] * s;
      bad |= nonfinite_bit(gi);
      const float mi = m_in[i] * mu + gi;
      m_out[i] = mi;
      d[i] = mi;
    }
  }
  return bad != 0;
}

// x -= lr*u over n elements, u = delta (no weight decay), or with decay = wd*x and w = mu*w + decay:
// u = (delta + mu*w) + decay (nesterov) or delta + w.
HOT void descend_range(float* x, const float* delta, float* w, int64_t n, float lr, float mu, float wd,
                       bool nesterov) {
  if (w == nullptr) {
    for (int64_t i = 0; i < n; ++i) x[i] = x[i] - delta[i] * lr;
  } else if (nesterov) {
    for (int64_t i = 0; i < n; ++i) {
      const float decay = x[i] * wd;
      const float wi = w[i] * mu + decay;
      w[i] = wi;
      x[i] = x[i] - ((delta[i] + wi * mu) + decay) * lr;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float wi = w[i] * mu + x[i] * wd;
      w[i] = wi;
      x[i] = x[i] - (delta[i] + wi) * lr;
    }
  }
}

}  // namespace

Gradients::Gradients(const std::vector<at::Tensor>& grads, const std::vector<int64_t>& sizes,
                     std::vector<double> mus_, std::vector<bool> nesterovs_)
    : mus(std::move(mus_)), nesterovs(std::move(nesterovs_)) {
  TORCH_CHECK_VALUE(grads.size() == sizes.size() && mus.size() == sizes.size() && nesterovs.size() == sizes.size(),
                    "one gradient, size, mu and nesterov flag per parameter");
  for (size_t k = 0; k < grads.size(); ++k) {
    const at::Tensor& g = grads[k];
    if (g.numel() == 0) {
      gs.push_back(nullptr);
    } else {
      check_flat(g, "every gradient");
      TORCH_CHECK_VALUE(g.numel() == sizes[k], "gradient ", k, " has ", g.numel(), " elements, its parameter ",
                        sizes[k]);
      gs.push_back(g.data_ptr<float>());
    }
    offsets.push_back(offsets.back() + sizes[k]);
  }
}

bool Gradients::momentum(int64_t lo, int64_t hi, float* d, const float* m_in, float* m_out, float s) const {
  bool bad = false;
  // the parameter holding element lo (the last of equal offsets: empty parameters are skipped)
  size_t k = std::upper_bound(offsets.begin(), offsets.end(), lo) - offsets.begin() - 1;
  for (int64_t at = lo; at < hi; ++k) {
    const int64_t end = std::min(hi, offsets[k + 1]);
    if (end > at) {
      const int64_t off = at - offsets[k], i = at - lo;
      bad |= gather_momentum_range(gs[k] ? gs[k] + off : nullptr, d + i, m_in + i, m_out + i, end - at, (float)mus[k],
                                   nesterovs[k], s);
    }
    at = std::max(at, end);
  }
  return bad;
}

// The worker's momentum of SPEC §1 for one param group, reading each gradient where backward left
// it: d = g + mu*m' (nesterov) or m', m' = mu*m + g, with g = grad*inv_scale (AMP) when given and
// zeros for a parameter without a gradient (an empty tensor). m' goes to momentum_out (another
// buffer: the step may not go ahead; the same one to update in place), d to the flat buffer d.
// Returns whether every gradient element (after the scale) is finite.
bool gather_momentum(const Grads& grads, at::Tensor d, const Momentum& momentum) {
  check_flat(d, "d");
  check_flat(momentum.current, "momentum");
  check_flat(momentum.next, "momentum_out");
  const Gradients gradients(grads.grads, grads.sizes, momentum.mus, momentum.nesterovs);
  const int64_t n = gradients.numel();
  TORCH_CHECK_VALUE(d.numel() == n && momentum.current.numel() == n && momentum.next.numel() == n,
                    "d and the momentum buffers must have the gradients' total length ", n);
  float* dp = d.data_ptr<float>();
  const float* m_in = momentum.current.data_ptr<float>();
  float* m_out = momentum.next.data_ptr<float>();
  const float s = grads.inv_scale.has_value() ? (float)*grads.inv_scale : 1.0f;
  std::atomic<bool> finite{true};
  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
    if (gradients.momentum(lo, hi, dp + lo, m_in + lo, m_out + lo, s)) finite.store(false);
  });
  return finite.load();
}

namespace {

// The update of SPEC §1 for one param group: weight decay with its own momentum buffer w
// (uncompressed), then x = x - lr*u, reading the parameters where they live (no flat copy of x).
// delta(lo, hi) gives Δ̃ over [lo, hi) of the group's elements (a pointer to its element lo), hi - lo <= kGrain.
template <class Delta>
void descend_with(std::vector<at::Tensor>& params, c10::optional<at::Tensor>& decay_buffer, double lr, double mu,
                  double weight_decay, bool nesterov, int64_t delta_numel, Delta delta) {
  std::vector<int64_t> offsets{0};
  std::vector<float*> xs;
  for (auto& p : params) {
    check_flat(p, "every parameter");
    xs.push_back(p.data_ptr<float>());
    offsets.push_back(offsets.back() + p.numel());
  }
  const int64_t n = offsets.back();
  TORCH_CHECK_VALUE(delta_numel == n, "delta has ", delta_numel, " elements, the parameters ", n);
  float* w = nullptr;
  if (weight_decay != 0.0) {
    TORCH_CHECK_VALUE(decay_buffer.has_value(), "weight decay needs its buffer");
    check_flat(*decay_buffer, "decay_buffer");
    TORCH_CHECK_VALUE(decay_buffer->numel() == n, "decay_buffer differs in length from the parameters");
    w = decay_buffer->data_ptr<float>();
  }
  at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end_of_task) {
    for (int64_t lo = begin; lo < end_of_task; lo += kGrain) {  // slices of at most kGrain (delta's promise)
      const int64_t hi = std::min(end_of_task, lo + kGrain);
      const float* d = delta(lo, hi) - lo;
      // the parameter holding element lo (the last of equal offsets: empty parameters are skipped)
      size_t k = std::upper_bound(offsets.begin(), offsets.end(), lo) - offsets.begin() - 1;
      for (int64_t at = lo; at < hi; ++k) {
        const int64_t end = std::min(hi, offsets[k + 1]);
        if (end > at)
          descend_range(xs[k] + (at - offsets[k]), d + at, w ? w + at : nullptr, end - at, (float)lr, (float)mu,
                        (float)weight_decay, nesterov);
        at = std::max(at, end);
      }
    }
  });
}

}  // namespace

// ``delta`` (Δ̃, flat over the group's parameters in order) is read only.
void descend_(std::vector<at::Tensor> params, at::Tensor delta, c10::optional<at::Tensor> decay_buffer,
              const Descent& descent) {
  check_flat(delta, "delta");
  const float* d = delta.data_ptr<float>();
  descend_with(params, decay_buffer, descent.lr, descent.mu, descent.weight_decay, descent.nesterov, delta.numel(),
               [d](int64_t lo, int64_t) { return d + lo; });
}

// Δ̃ decompressed a slice at a time into a per-thread buffer that stays in cache for the update:
// Δ̃ is never written out in full (saves writing and reading back 8 bytes per element).
void descend_blocksign_(std::vector<at::Tensor> params, const Pieces& in, c10::optional<at::Tensor> decay_buffer,
                        const Descent& descent) {
  int64_t n = 0;
  for (const auto& p : params) n += p.numel();
  const BlocksignPieces pieces(in.starts, in.scales, in.bits, in.block_sizes, n);
  descend_with(params, decay_buffer, descent.lr, descent.mu, descent.weight_decay, descent.nesterov, n,
               [&pieces](int64_t lo, int64_t hi) {
    thread_local std::vector<float> slice;
    slice.resize(kGrain);
    pieces.fill(lo, hi, slice.data());
    return slice.data();
  });
}
