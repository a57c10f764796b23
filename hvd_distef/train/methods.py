"""The training CLI's methods: presets of compression and topology (``--method``), each with its default
lr, and the wire width of stock Horovod's compressions. Imports nothing; read by the CLI's parser, the
training loop and the experiments."""

#: the compressions of ``--method horovod``: hvd.Compression's own, and bytes per element on the wire
HOROVOD_COMPRESSION = {"none": 4, "fp16": 2}

#: method -> what it sets; "lr" is the default learning rate of that method; "optimizer" says whose
#: DistributedOptimizer runs it (ours unless it says "horovod")
METHODS = {
    "horovod": {"optimizer": "horovod", "topology": "allreduce", "compression": "none", "lr": 0.1,
                "help": "stock horovod.torch.DistributedOptimizer wrapping torch's SGD with Nesterov momentum: "
                        "per-tensor hooks and tensor fusion, allreduce overlapping backward "
                        "(--compression none or fp16: hvd.Compression.none/fp16)"},
    "sgdm": {"topology": "allreduce", "compression": "none", "lr": 0.1,
             "help": "allreduce SGD with Nesterov momentum through our DistributedOptimizer "
                     "(topology allreduce): one fused allreduce of all gradients after backward"},
    "ef-blocksgdm": {"topology": "ps", "compression": "blocksign", "lr": 0.1,
                     "help": "the paper's dist-EF-BlockSGDM: blockwise sign, two-way error feedback"},
    "ef-sgdm": {"topology": "ps", "compression": "sign", "lr": 0.1,
                "help": "dist-EF-SGDM: one sign scale for the whole buffer"},
    "signum": {"topology": "majority_vote", "compression": "sign", "lr": 0.001,
               "help": "signum with majority vote (Bernstein et al. 2019)"},
    "ef-allgather": {"topology": "allgather", "compression": "blocksign", "lr": 0.1,
                     "help": "one-way error feedback, allgather of worker payloads"},
}
