// The optimizer's element-wise passes around the exchange (SPEC §1), each fused into one pass over
// memory: the momentum before compression, and weight decay plus the descent after it. The torch
// path (hvd_distef/_torch_kernels.py) runs the same float operations in the same order, several
// passes each; built with -ffp-contract=off, so the products round before the sums there too.
#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t kGrain = 1 << 15;

void check_flat(const at::Tensor& t, const char* what) {
  TORCH_CHECK_VALUE(t.device().is_cpu() && t.dtype() == at::kFloat && t.is_contiguous(), what,
                    " must be a contiguous float32 CPU tensor");
}

HOT void momentum_range(float* g, float* m, int64_t n, float mu, bool nesterov) {
  if (nesterov) {
    for (int64_t i = 0; i < n; ++i) {
      const float mi = m[i] * mu + g[i];
      m[i] = mi;
      g[i] = g[i] + mi * mu;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const float mi = m[i] * mu + g[i];
      m[i] = mi;
      g[i] = mi;
    }
  }
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

// m = mu*m + g;  g = g + mu*m (nesterov) or m: the worker's momentum of SPEC §1, in place.
void momentum_(at::Tensor grad, at::Tensor momentum, double mu, bool nesterov) {
  check_flat(grad, "grad");
  check_flat(momentum, "momentum");
  TORCH_CHECK_VALUE(grad.numel() == momentum.numel(), "grad and momentum differ in length");
  float* g = grad.data_ptr<float>();
  float* m = momentum.data_ptr<float>();
  at::parallel_for(0, grad.numel(), kGrain, [&](int64_t lo, int64_t hi) {
    momentum_range(g + lo, m + lo, hi - lo, (float)mu, nesterov);
  });
}

// The update of SPEC §1 for one param group: weight decay with its own momentum buffer w
// (uncompressed), then x = x - lr*u, reading the parameters where they live (no flat copy of x).
// ``delta`` (Δ̃, flat over the group's parameters in order) is read only.
void descend_(std::vector<at::Tensor> params, at::Tensor delta, c10::optional<at::Tensor> decay_buffer,
              double lr, double mu, double weight_decay, bool nesterov) {
  check_flat(delta, "delta");
  std::vector<int64_t> offsets{0};
  std::vector<float*> xs;
  for (auto& p : params) {
    check_flat(p, "every parameter");
    xs.push_back(p.data_ptr<float>());
    offsets.push_back(offsets.back() + p.numel());
  }
  const int64_t n = offsets.back();
  TORCH_CHECK_VALUE(delta.numel() == n, "delta has ", delta.numel(), " elements, the parameters ", n);
  float* w = nullptr;
  if (weight_decay != 0.0) {
    TORCH_CHECK_VALUE(decay_buffer.has_value(), "weight decay needs its buffer");
    check_flat(*decay_buffer, "decay_buffer");
    TORCH_CHECK_VALUE(decay_buffer->numel() == n, "decay_buffer differs in length from the parameters");
    w = decay_buffer->data_ptr<float>();
  }
  const float* d = delta.data_ptr<float>();
  at::parallel_for(0, n, kGrain, [&](int64_t lo, int64_t hi) {
    // the parameter holding element lo (the last of equal offsets: empty parameters are skipped)
    size_t k = std::upper_bound(offsets.begin(), offsets.end(), lo) - offsets.begin() - 1;
    for (int64_t at = lo; at < hi; ++k) {
      const int64_t end = std::min(hi, offsets[k + 1]);
      if (end > at)
        descend_range(xs[k] + (at - offsets[k]), d + at, w ? w + at : nullptr, end - at, (float)lr, (float)mu,
                      (float)weight_decay, nesterov);
      at = std::max(at, end);
    }
  });
}
