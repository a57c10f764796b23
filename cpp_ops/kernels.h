// The compiled kernels of hvd_distef (CPU): declarations shared by the sources and the bindings.
// hvd_distef/_torch_kernels.py holds the reference of each, with the same signature.
#pragma once

#include <torch/extension.h>

#include <tuple>
#include <vector>

// Each loop is written so that the compiler vectorizes it; HOT functions are also compiled for
// AVX2 and picked at run time, so one build runs on any x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HOT __attribute__((target_clones("avx2", "default")))
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

// blocksign.cpp: blockwise scaled sign with error feedback (SPEC §1, §2)
std::tuple<torch::Tensor, torch::Tensor> blocksign_feedback(torch::Tensor d, torch::Tensor error,
                                                            std::vector<int64_t> block_sizes, Segments segments);
std::tuple<torch::Tensor, torch::Tensor> blocksign_compress(torch::Tensor x, std::vector<int64_t> block_sizes);
torch::Tensor blocksign_decompress_mean(std::vector<torch::Tensor> scales, std::vector<torch::Tensor> bits,
                                        std::vector<int64_t> block_sizes, int64_t numel,
                                        c10::optional<torch::Tensor> out);
torch::Tensor blocksign_decompress(torch::Tensor scales, torch::Tensor bits, std::vector<int64_t> block_sizes,
                                   int64_t numel, c10::optional<torch::Tensor> out);
std::tuple<torch::Tensor, torch::Tensor> blocksign_server_feedback(std::vector<torch::Tensor> scales,
                                                                   std::vector<torch::Tensor> bits,
                                                                   torch::Tensor error,
                                                                   std::vector<int64_t> block_sizes,
                                                                   Segments segments);

torch::Tensor pack_signs(torch::Tensor x);

// majority_vote.cpp: signum's vote (SPEC §3)
torch::Tensor majority_vote(torch::Tensor rows, int64_t numel);
torch::Tensor unpack_vote(torch::Tensor vote, int64_t numel, c10::optional<torch::Tensor> out);

// sgd_update.cpp: the optimizer's element-wise passes around the exchange (SPEC §1)
void momentum_(torch::Tensor grad, torch::Tensor momentum, double mu, bool nesterov);
void descend_(std::vector<torch::Tensor> params, torch::Tensor delta, c10::optional<torch::Tensor> decay_buffer,
              double lr, double mu, double weight_decay, bool nesterov);
