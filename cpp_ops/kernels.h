// The compiled kernels of hvd_distef (CPU): declarations shared by the sources and the bindings.
// ATen only (not torch/extension.h): the kernel sources compile in a fraction of the time.
// hvd_distef/_torch_kernels.py holds the reference of each, with the same signature.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <tuple>
#include <vector>

// Each loop is written so that the compiler vectorizes it; HOT functions are also compiled for
// AVX2 and picked at run time, so one build runs on any x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HOT __attribute__((target_clones("avx2", "default")))
#define HVD_DISTEF_X86_GCC 1  // where hand-written AVX2 twins are also built (picked at run time)
#else
#define HOT
#endif

// kSigns.v[byte][k] = +1 if bit k of byte is set, else -1 (kOnes: 1 or 0): unpacks 8 bits with one
// vector load.
struct BitTable {
  alignas(32) float v[256][8];
  BitTable(float set, float unset) {
    for (int b = 0; b < 256; ++b)
      for (int k = 0; k < 8; ++k) v[b][k] = ((b >> k) & 1) ? set : unset;
  }
};
inline const BitTable kSigns(1.0f, -1.0f);
inline const BitTable kOnes(1.0f, 0.0f);

using Segments = std::vector<std::tuple<int64_t, int64_t, double>>;  // (start, stop, ratio) per param group

// What a kernel reads, what it writes and its options, field for field the structures of
// hvd_distef/kernel_args.py (bindings.cpp reads them from the Python objects; their docstrings say more).
struct Grads {  // read: the gradients of consecutive parameters (empty: zeros), times inv_scale (AMP)
  std::vector<at::Tensor> grads;
  std::vector<int64_t> sizes;
  c10::optional<double> inv_scale;
};
struct Momentum {  // m' = mu*m + g into next (current read), d = g + mu*m' (nesterov) or m'; per parameter
  at::Tensor current, next;
  std::vector<double> mus;
  std::vector<bool> nesterovs;
};
struct Feedback {  // a shard's error step: e read from error, p written to error_out (prev: C still to subtract)
  at::Tensor error, error_out;
  int64_t start;
  std::vector<int64_t> block_sizes;
  Segments segments;
  c10::optional<at::Tensor> prev_scales, prev_bits;
};
struct Descent {  // the update's options (SPEC §1)
  double lr, mu, weight_decay;
  bool nesterov;
};
struct Pieces {  // read: a param group's Δ̃ as blocksign payloads (see BlocksignPieces)
  std::vector<int64_t> starts;
  std::vector<at::Tensor> scales, bits;
  std::vector<std::vector<int64_t>> block_sizes;
};

// blocksign.cpp: blockwise scaled sign with error feedback (SPEC §1, §2). The error steps leave p
// in ``error`` and defer e = p - C(p) to their next call (prev_scales, prev_bits = that C(p)).
std::tuple<at::Tensor, at::Tensor> blocksign_feedback(at::Tensor d, at::Tensor error,
                                                            std::vector<int64_t> block_sizes, Segments segments,
                                                            c10::optional<at::Tensor> prev_scales,
                                                            c10::optional<at::Tensor> prev_bits);
// The worker's momentum and error step on one shard in one pass (blocksign.cpp: what it reads and
// writes); returns (scales, bits, usable).
std::tuple<at::Tensor, at::Tensor, bool> worker_blocksign_feedback(const Grads& grads, const Momentum& momentum,
                                                                   const Feedback& feedback);
std::tuple<at::Tensor, at::Tensor> blocksign_server_feedback(
    std::vector<at::Tensor> scales, std::vector<at::Tensor> bits, at::Tensor error,
    std::vector<int64_t> block_sizes, Segments segments, c10::optional<at::Tensor> prev_scales,
    c10::optional<at::Tensor> prev_bits);
std::tuple<at::Tensor, at::Tensor> blocksign_compress(at::Tensor x, std::vector<int64_t> block_sizes);
at::Tensor blocksign_decompress_mean(std::vector<at::Tensor> scales, std::vector<at::Tensor> bits,
                                        std::vector<int64_t> block_sizes, int64_t numel,
                                        c10::optional<at::Tensor> out);
at::Tensor blocksign_decompress(at::Tensor scales, at::Tensor bits, std::vector<int64_t> block_sizes,
                                   int64_t numel, c10::optional<at::Tensor> out);
at::Tensor pack_signs(at::Tensor x);

// Δ̃ of a range of n elements given as blocksign payloads, decompressed a slice at a time where it is
// used: piece k (scales[k], bits[k], block_sizes[k]) holds elements [starts[k], starts[k] + its numel)
// of the range (it may begin before 0 or end after n); in order, the pieces leave no gap in [0, n).
// fill(lo, hi, out) writes elements [lo, hi) into out[0, hi - lo), as blocksign_decompress would.
class BlocksignPieces {
 public:
  BlocksignPieces(const std::vector<int64_t>& starts, const std::vector<at::Tensor>& scales,
                  const std::vector<at::Tensor>& bits, const std::vector<std::vector<int64_t>>& block_sizes,
                  int64_t n);
  ~BlocksignPieces();
  void fill(int64_t lo, int64_t hi, float* out) const;

 private:
  struct Piece;
  std::vector<std::unique_ptr<Piece>> pieces_;
};

// dense_feedback.cpp: the compensation p = d + r*e of the generic error step, into out (which may be d,
// else a new vector), and fp16's whole error step (p = x + r*e; h = float16(p) saturated at ±max_value;
// e = p - h) where x is d (sources: one float32 vector) or the mean of M float16 payloads (the
// server's), each in one pass.
at::Tensor compensate(at::Tensor d, at::Tensor error, Segments segments, c10::optional<at::Tensor> out);
at::Tensor half_feedback(std::vector<at::Tensor> sources, at::Tensor error, Segments segments, double max_value,
                         c10::optional<at::Tensor> out);

// majority_vote.cpp: signum's vote (SPEC §3)
at::Tensor majority_vote(at::Tensor rows, int64_t numel);
at::Tensor signum_momentum(at::Tensor g, at::Tensor momentum, at::Tensor momentum_out, Segments segments);
at::Tensor unpack_vote(at::Tensor vote, int64_t numel, c10::optional<at::Tensor> out);

// sgd_update.cpp: the optimizer's element-wise passes around the exchange (SPEC §1)
// The gradients of consecutive parameters where backward left them, end to end: parameter k spans
// [offsets[k], offsets[k+1]), gs[k] is its data (null where it has none: an empty tensor: zeros),
// mus[k] and nesterovs[k] its param group's momentum.
struct Gradients {
  std::vector<int64_t> offsets{0};
  std::vector<const float*> gs;
  std::vector<double> mus;
  std::vector<bool> nesterovs;
  Gradients(const std::vector<at::Tensor>& grads, const std::vector<int64_t>& sizes, std::vector<double> mus,
            std::vector<bool> nesterovs);
  int64_t numel() const { return offsets.back(); }
  // The momentum of SPEC §1 over elements [lo, hi): g = grad*s, m_out = mu*m_in + g, d = g + mu*m_out
  // (nesterov) or m_out; d, m_in and m_out point to element lo. Returns whether some g is not finite.
  bool momentum(int64_t lo, int64_t hi, float* d, const float* m_in, float* m_out, float s) const;
};
bool gather_momentum(const Grads& grads, at::Tensor d, const Momentum& momentum);
void descend_(std::vector<at::Tensor> params, at::Tensor delta, c10::optional<at::Tensor> decay_buffer,
              const Descent& descent);
// descend_ with Δ̃ as blocksign payloads (BlocksignPieces), decompressed slice by slice in the same pass
void descend_blocksign_(std::vector<at::Tensor> params, const Pieces& pieces, c10::optional<at::Tensor> decay_buffer,
                        const Descent& descent);
