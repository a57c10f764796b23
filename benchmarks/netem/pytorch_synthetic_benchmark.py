# Horovod's examples/pytorch/pytorch_synthetic_benchmark.py (v0.28.1), changed only where marked
# "hvd_distef:": --distef-topology swaps hvd.DistributedOptimizer for hvd_distef.DistributedOptimizer
# on that topology, keeping the script's hvd.Compression unless --distef-compression names one of ours
# (--distef-overlap, --distef-bucket-cap-mb: overlap=True and its bucket size); --image-size (upstream:
# 224); the model comes from hvd_distef.train.models with torchvision's layout (ImageNet stem), as
# torchvision's wheels do not load against the CPU build of torch installed here. Compare with
# `git show HEAD:examples/pytorch/...`.
import argparse
import functools
import torch.backends.cudnn as cudnn
import torch.nn.functional as F
import torch.optim as optim
import torch.utils.data.distributed
from hvd_distef.train.models import MODELS  # hvd_distef: torchvision's layout, below
import hvd_distef
import horovod.torch as hvd
import timeit
import numpy as np

# Benchmark settings
parser = argparse.ArgumentParser(description='PyTorch Synthetic Benchmark',
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
parser.add_argument('--fp16-allreduce', action='store_true', default=False,
                    help='use fp16 compression during allreduce')

parser.add_argument('--model', type=str, default='resnet50',
                    help='model to benchmark')
parser.add_argument('--batch-size', type=int, default=32,
                    help='input batch size')

parser.add_argument('--num-warmup-batches', type=int, default=10,
                    help='number of warm-up batches that don\'t count towards benchmark')
parser.add_argument('--num-batches-per-iter', type=int, default=10,
                    help='number of batches per benchmark iteration')
parser.add_argument('--num-iters', type=int, default=10,
                    help='number of benchmark iterations')

parser.add_argument('--no-cuda', action='store_true', default=False,
                    help='disables CUDA training')

parser.add_argument('--use-adasum', action='store_true', default=False,
                    help='use adasum algorithm to do reduction')

# hvd_distef: the swap, and the image size
parser.add_argument('--distef-topology', default=None,
                    help='use hvd_distef.DistributedOptimizer on this topology (only the class swapped: the '
                         'compression stays the script\'s hvd.Compression, unless --distef-compression)')
parser.add_argument('--distef-compression', default=None,
                    help='with --distef-topology: this hvd_distef compressor instead (e.g. blocksign)')
parser.add_argument('--distef-overlap', action='store_true', default=False,
                    help='with --distef-topology: exchange gradient buckets during backward (overlap=True)')
parser.add_argument('--distef-bucket-cap-mb', type=float, default=25.0,
                    help='with --distef-overlap: MiB per bucket (bucket_cap_mb=)')
parser.add_argument('--image-size', type=int, default=224,
                    help='height and width of the synthetic images')

args = parser.parse_args()
args.cuda = not args.no_cuda and torch.cuda.is_available()

hvd.init()

if args.cuda:
    # Horovod: pin GPU to local rank.
    torch.cuda.set_device(hvd.local_rank())

cudnn.benchmark = True

# Set up standard model.
model = MODELS[args.model]((3, 224, 224), 1000)  # hvd_distef: torchvision's layout at any --image-size

# By default, Adasum doesn't need scaling up learning rate.
lr_scaler = hvd.size() if not args.use_adasum else 1

if args.cuda:
    # Move model to GPU.
    model.cuda()
    # If using GPU Adasum allreduce, scale learning rate by local_size.
    if args.use_adasum and hvd.nccl_built():
        lr_scaler = hvd.local_size()

optimizer = optim.SGD(model.parameters(), lr=0.01 * lr_scaler)

# Horovod: (optional) compression algorithm.
compression = hvd.Compression.fp16 if args.fp16_allreduce else hvd.Compression.none

# Horovod: wrap optimizer with DistributedOptimizer.
# hvd_distef: the class swapped
DistributedOptimizer = hvd.DistributedOptimizer
if args.distef_topology:
    DistributedOptimizer = functools.partial(hvd_distef.DistributedOptimizer, topology=args.distef_topology,
                                             overlap=args.distef_overlap, bucket_cap_mb=args.distef_bucket_cap_mb)
    compression = args.distef_compression or compression
optimizer = DistributedOptimizer(optimizer,
                                 named_parameters=model.named_parameters(),
                                 compression=compression,
                                 op=hvd.Adasum if args.use_adasum else hvd.Average)

# Horovod: broadcast parameters & optimizer state.
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
hvd.broadcast_optimizer_state(optimizer, root_rank=0)

# Set up fixed fake data
data = torch.randn(args.batch_size, 3, args.image_size, args.image_size)  # hvd_distef: size
target = torch.LongTensor(args.batch_size).random_() % 1000
if args.cuda:
    data, target = data.cuda(), target.cuda()


def benchmark_step():
    optimizer.zero_grad()
    output = model(data)
    loss = F.cross_entropy(output, target)
    loss.backward()
    optimizer.step()


def log(s, nl=True):
    if hvd.rank() != 0:
        return
    print(s, end='\n' if nl else '')


log('Model: %s' % args.model)
log('Batch size: %d' % args.batch_size)
device = 'GPU' if args.cuda else 'CPU'
log('Number of %ss: %d' % (device, hvd.size()))

# Warm-up
log('Running warmup...')
timeit.timeit(benchmark_step, number=args.num_warmup_batches)

# Benchmark
log('Running benchmark...')
img_secs = []
for x in range(args.num_iters):
    time = timeit.timeit(benchmark_step, number=args.num_batches_per_iter)
    img_sec = args.batch_size * args.num_batches_per_iter / time
    log('Iter #%d: %.1f img/sec per %s' % (x, img_sec, device))
    img_secs.append(img_sec)

# Results
img_sec_mean = np.mean(img_secs)
img_sec_conf = 1.96 * np.std(img_secs)
log('Img/sec per %s: %.1f +-%.1f' % (device, img_sec_mean, img_sec_conf))
log('Total img/sec on %d %s(s): %.1f +-%.1f' %
    (hvd.size(), device, hvd.size() * img_sec_mean, hvd.size() * img_sec_conf))
