// The Python module hvd_distef._cpp_ops.
#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Every kernel runs without the GIL (its arguments are converted before, its result after): the
  // bucket pipeline's thread compresses while backward runs Python hooks, and data loader threads
  // run on (SPEC §4).
  const auto release = py::call_guard<py::gil_scoped_release>();
  m.doc() = "hvd_distef's fused CPU kernels; see hvd_distef/_torch_kernels.py for the reference of each";
  m.def("blocksign_feedback", &blocksign_feedback, release, "EF step: p = d + r (e - C_prev); C(p); p left in e",
        py::arg("d"), py::arg("error"), py::arg("block_sizes"), py::arg("segments"),
        py::arg("prev_scales") = py::none(), py::arg("prev_bits") = py::none());
  m.def("worker_blocksign_feedback", &worker_blocksign_feedback, release,
        "the worker's momentum and EF step in one pass, p written to error_out; (scales, bits, usable)",
        py::arg("grads"), py::arg("sizes"), py::arg("mus"), py::arg("nesterovs"), py::arg("offset"),
        py::arg("momentum"), py::arg("momentum_out"), py::arg("error"), py::arg("error_out"), py::arg("block_sizes"),
        py::arg("segments"), py::arg("prev_scales") = py::none(), py::arg("prev_bits") = py::none(),
        py::arg("inv_scale") = py::none());
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
  m.def("gather_momentum", &gather_momentum, release,
        "m' = mu m + g; d = g + mu m' (nesterov) or m', g read from each gradient; returns all-finite");
  m.def("descend_", &descend_, release, "w = mu w + wd x; x -= lr (delta + (nesterov ? mu w + wd x : w))",
        py::arg("params"), py::arg("delta"), py::arg("decay_buffer"), py::arg("lr"), py::arg("mu"),
        py::arg("weight_decay"), py::arg("nesterov"));
  m.def("descend_blocksign_", &descend_blocksign_, release, "descend_ with delta given as blocksign payloads",
        py::arg("params"), py::arg("starts"), py::arg("scales"), py::arg("bits"), py::arg("block_sizes"),
        py::arg("decay_buffer"), py::arg("lr"), py::arg("mu"), py::arg("weight_decay"), py::arg("nesterov"));
}
