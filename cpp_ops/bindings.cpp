// The Python module hvd_distef._cpp_ops.
#include <torch/extension.h>

#include "kernels.h"

namespace {

// The structures of hvd_distef/kernel_args.py, read field by field from the Python objects (with the GIL).
template <class T>
T field(py::handle h, const char* name) {
  return h.attr(name).cast<T>();
}
Grads grads_of(py::handle h) {
  return {field<std::vector<at::Tensor>>(h, "grads"), field<std::vector<int64_t>>(h, "sizes"),
          field<c10::optional<double>>(h, "inv_scale")};
}
Momentum momentum_of(py::handle h) {
  return {field<at::Tensor>(h, "current"), field<at::Tensor>(h, "next"), field<std::vector<double>>(h, "mus"),
          field<std::vector<bool>>(h, "nesterovs")};
}
Feedback feedback_of(py::handle h) {
  return {field<at::Tensor>(h, "error"), field<at::Tensor>(h, "error_out"), field<int64_t>(h, "start"),
          field<std::vector<int64_t>>(h, "block_sizes"), field<Segments>(h, "segments"),
          field<c10::optional<at::Tensor>>(h, "prev_scales"), field<c10::optional<at::Tensor>>(h, "prev_bits")};
}
Descent descent_of(py::handle h) {
  return {field<double>(h, "lr"), field<double>(h, "mu"), field<double>(h, "weight_decay"), field<bool>(h, "nesterov")};
}
Pieces pieces_of(py::handle h) {
  return {field<std::vector<int64_t>>(h, "starts"), field<std::vector<at::Tensor>>(h, "scales"),
          field<std::vector<at::Tensor>>(h, "bits"), field<std::vector<std::vector<int64_t>>>(h, "block_sizes")};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Every kernel runs without the GIL (its arguments are converted before, its result after): the
  // bucket pipeline's thread compresses while backward runs Python hooks, and data loader threads
  // run on (SPEC §4).
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.doc() = "hvd_distef's fused CPU kernels; see hvd_distef/_torch_kernels.py for the reference of each";
  m.def("blocksign_feedback", &blocksign_feedback, release, "EF step: p = d + r (e - C_prev); C(p); p left in e",
        py::arg("d"), py::arg("error"), py::arg("block_sizes"), py::arg("segments"),
        py::arg("prev_scales") = py::none(), py::arg("prev_bits") = py::none());
  // the kernels that take structures convert them with the GIL, then release it for the pass
  m.def("worker_blocksign_feedback", [](py::handle g, py::handle mo, py::handle f) {
        const Grads grads = grads_of(g);
        const Momentum momentum = momentum_of(mo);
        const Feedback feedback = feedback_of(f);
        py::gil_scoped_release nogil;
        return worker_blocksign_feedback(grads, momentum, feedback);
      }, "the worker's momentum and EF step in one pass, p written to error_out; (scales, bits, usable)",
      py::arg("grads"), py::arg("momentum"), py::arg("feedback"));
  m.def("blocksign_compress", &blocksign_compress, release, "scales and packed signs of x");
  m.def("blocksign_decompress", &blocksign_decompress, release, "scale_b * sign", py::arg("scales"), py::arg("bits"),
        py::arg("block_sizes"), py::arg("numel"), py::arg("out") = py::none());
  m.def("blocksign_decompress_mean", &blocksign_decompress_mean, release, "mean of M decompressed payloads",
        py::arg("scales"), py::arg("bits"), py::arg("block_sizes"), py::arg("numel"), py::arg("out") = py::none());
  m.def("blocksign_server_feedback", &blocksign_server_feedback, release, "server step: mean + r (e - C_prev), C, p left in e",
        py::arg("scales"), py::arg("bits"), py::arg("error"), py::arg("block_sizes"), py::arg("segments"),
        py::arg("prev_scales") = py::none(), py::arg("prev_bits") = py::none());
  m.def("compensate", &compensate, release, "p = d + r e per segment into out (may be d) or a new vector",
        py::arg("d"), py::arg("error"), py::arg("segments"), py::arg("out") = py::none());
  m.def("half_feedback", &half_feedback, release,
        "fp16's error step: p = x + r e (x: d, or the mean of float16 payloads); h = fp16(p) saturated; e = p - h",
        py::arg("sources"), py::arg("error"), py::arg("segments"), py::arg("max_value"), py::arg("out") = py::none());
  m.def("pack_signs", &pack_signs, release, "packed signs of x (bit set where x >= 0)");
  m.def("signum_momentum", &signum_momentum, release,
        "signum's worker step: m' = mu m + (1 - mu) g per segment (mu = 0: m' = m, g sent); packed signs sent",
        py::arg("g"), py::arg("momentum"), py::arg("momentum_out"), py::arg("segments"));
  m.def("majority_vote", &majority_vote, release, "M packed sign rows -> (positive, non-zero) bit masks of their vote");
  m.def("unpack_vote", &unpack_vote, release, "the vote as float32 -1, 0, +1", py::arg("vote"), py::arg("numel"),
        py::arg("out") = py::none());
  m.def("gather_momentum", [](py::handle g, at::Tensor d, py::handle mo) {
        const Grads grads = grads_of(g);
        const Momentum momentum = momentum_of(mo);
        py::gil_scoped_release nogil;
        return gather_momentum(grads, d, momentum);
      }, "m' = mu m + g; d = g + mu m' (nesterov) or m', g read from each gradient; returns all-finite",
      py::arg("grads"), py::arg("d"), py::arg("momentum"));
  m.def("descend_", [](std::vector<at::Tensor> params, at::Tensor delta, c10::optional<at::Tensor> decay,
                       py::handle de) {
        const Descent descent = descent_of(de);
        py::gil_scoped_release nogil;
        descend_(params, delta, decay, descent);
      }, "w = mu w + wd x; x -= lr (delta + (nesterov ? mu w + wd x : w))",
      py::arg("params"), py::arg("delta"), py::arg("decay_buffer"), py::arg("descent"));
  m.def("descend_blocksign_", [](std::vector<at::Tensor> params, py::handle pi, c10::optional<at::Tensor> decay,
                                 py::handle de) {
        const Pieces pieces = pieces_of(pi);
        const Descent descent = descent_of(de);
        py::gil_scoped_release nogil;
        descend_blocksign_(params, pieces, decay, descent);
      }, "descend_ with delta given as blocksign payloads",
      py::arg("params"), py::arg("pieces"), py::arg("decay_buffer"), py::arg("descent"));
}
