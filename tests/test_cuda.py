"""CUDA parameters (issue 14): the kernels in use on CUDA tensors against the CPU ones, every
topology and compressor on a GPU against the same run on the CPU, the staging of CUDA bytes for MPI,
and two ranks sharing one GPU. Tests marked ``cuda`` are skipped where torch sees no GPU (conftest);
``scripts/gpu_check.sh`` runs them on a GPU machine."""
import importlib.util

import pytest
import torch

import cuda_train
from conftest import run_cases, assert_case
from hvd_distef import _kernels
from hvd_distef import _torch_kernels as ref
from hvd_distef.comm import CUDA_AWARE_ENV, Comm

cuda = pytest.mark.cuda


def rand(n, seed, device="cpu"):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(device)


def resnet_like_blocks(n, pieces, seed):
    gen = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(n - 1, generator=gen)[: pieces - 1].add(1).tolist())
    return [b - a for a, b in zip([0] + cuts, cuts + [n])]


def test_model_split_over_devices_is_refused():
    """A model on two devices of one rank (here the CPU and torch's meta device) raises, naming both."""
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3, device="meta"))
    import hvd_distef
    with pytest.raises(ValueError, match=r"more than one device \(a on cpu; b on meta\).*one process per GPU"):
        hvd_distef.DistributedOptimizer(torch.optim.SGD([a, b], lr=0.1), named_parameters=[("a", a), ("b", b)])


@cuda
def test_cuda_tensors_use_triton_where_installed():
    expected = "hvd_distef._triton_kernels" if importlib.util.find_spec("triton") else "hvd_distef._torch_kernels"
    assert _kernels.gpu_path().__name__ == expected


@cuda
@pytest.mark.parametrize("n,pieces", [(1000, 3), (3_000_017, 60)])
def test_worker_and_server_steps_on_cuda_match_cpu(n, pieces):
    """Three deferred worker steps and a server step through ``_kernels`` on CUDA (Triton where
    installed) against the CPU kernels: bits equal, scales and errors to float rounding."""
    blocks = resnet_like_blocks(n, pieces, 1)
    segments = [(0, n // 3, 0.5), (n // 3, n, 10.0)]
    e_cpu, e_gpu = rand(n, 9), rand(n, 9, "cuda")
    prev_cpu, prev_gpu = (None, None), (None, None)
    for t in range(3):
        prev_cpu = _kernels.blocksign_feedback(rand(n, t), e_cpu, blocks, segments, *prev_cpu)
        prev_gpu = _kernels.blocksign_feedback(rand(n, t, "cuda"), e_gpu, blocks, segments, *prev_gpu)
        assert torch.equal(prev_gpu[1].cpu(), prev_cpu[1])
        torch.testing.assert_close(prev_gpu[0].cpu(), prev_cpu[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(e_gpu.cpu(), e_cpu, rtol=1e-6, atol=1e-6 * float(prev_cpu[0].max()))
    payloads = [ref.blocksign_compress(rand(n, 20 + m), blocks) for m in range(3)]
    scales, bits = [p[0] for p in payloads], [p[1] for p in payloads]
    s_cpu, b_cpu = _kernels.blocksign_server_feedback(scales, bits, e_cpu, blocks, segments, *prev_cpu)
    s_gpu, b_gpu = _kernels.blocksign_server_feedback([s.cuda() for s in scales], [b.cuda() for b in bits], e_gpu,
                                                      blocks, segments, *prev_gpu)
    assert torch.equal(b_gpu.cpu(), b_cpu)
    torch.testing.assert_close(s_gpu.cpu(), s_cpu, rtol=1e-6, atol=0)
    assert torch.equal(_kernels.blocksign_decompress_mean([s.cuda() for s in scales], [b.cuda() for b in bits],
                                                          blocks, n).cpu(),
                       _kernels.blocksign_decompress_mean(scales, bits, blocks, n))


@cuda
@pytest.mark.parametrize("nesterov", [True, False])
def test_momentum_and_update_on_cuda_match_cpu(nesterov):
    sizes = [2359296, 0, 64, 1000, 9408]
    params_cpu = [rand(k, i) for i, k in enumerate(sizes)]
    params_gpu = [p.cuda() for p in params_cpu]
    n = sum(sizes)
    delta, w_cpu, g_cpu, m_cpu = rand(n, 10), rand(n, 11), rand(n, 12), rand(n, 13)
    w_gpu, g_gpu, m_gpu = w_cpu.cuda(), g_cpu.cuda(), m_cpu.cuda()
    _kernels.descend_(params_cpu, delta, w_cpu, _kernels.Descent(0.1, 0.9, 5e-4, nesterov))
    _kernels.descend_(params_gpu, delta.cuda(), w_gpu, _kernels.Descent(0.1, 0.9, 5e-4, nesterov))
    d_cpu, d_gpu = torch.empty(n), torch.empty(n, device="cuda")
    assert _kernels.gather_momentum(_kernels.Grads([g_cpu], [n]), d_cpu, _kernels.Momentum(m_cpu, m_cpu, [0.9], [nesterov]))
    assert _kernels.gather_momentum(_kernels.Grads([g_gpu], [n]), d_gpu, _kernels.Momentum(m_gpu, m_gpu, [0.9], [nesterov]))
    for a, b in [*zip(params_gpu, params_cpu), (w_gpu, w_cpu), (d_gpu, d_cpu), (m_gpu, m_cpu)]:
        assert torch.equal(a.cpu(), b)  # element-wise float32 arithmetic in the same order, no FMA


@cuda
@pytest.mark.parametrize("aware", ["0", "1"])
def test_staging_round_trips_cuda_bytes(aware, monkeypatch):
    """A world of one: CUDA bytes through every collective come back equal and on the GPU; without
    CUDA-aware MPI they pass through the same two pinned buffers every time."""
    if aware == "1":
        from mpi4py import MPI
        from hvd_distef.comm import cuda_aware_mpi
        monkeypatch.delenv(CUDA_AWARE_ENV, raising=False)
        if not cuda_aware_mpi(MPI):
            pytest.skip("this MPI is not CUDA-aware")
    monkeypatch.setenv(CUDA_AWARE_ENV, aware)
    comm = Comm()
    data = torch.randint(0, 256, (1001,), dtype=torch.uint8, device="cuda")
    for _ in range(2):
        outs = [comm.gather(data, 0), comm.alltoallv(data, [1001], [1001]), comm.allgatherv(data, [1001]),
                comm.sendrecv(data, 0, 1001, 0), comm.bcast(data.clone(), 0)]
        for out in outs:
            assert out.is_cuda and torch.equal(out, data)
        if aware == "0":
            pinned = {k: (v.data_ptr(), v.is_pinned()) for k, v in comm.staging._pinned.items()}
            assert sorted(pinned) == ["recv", "send"] and all(p for _, p in pinned.values())
            assert pinned == {k: (v.data_ptr(), True) for k, v in comm.staging._pinned.items()}
    summed = torch.arange(10, dtype=torch.float32, device="cuda")
    assert torch.equal(comm.allreduce_sum_(summed).cpu(), torch.arange(10, dtype=torch.float32))


@cuda
@pytest.mark.parametrize("topology,compression", cuda_train.COMBINATIONS)
def test_training_on_cuda_equals_cpu(topology, compression):
    """One rank: the parameters after a few steps on the GPU equal the CPU run's to float rounding."""
    gpu = cuda_train.train("cuda", topology, compression)
    cpu = cuda_train.train("cpu", topology, compression)
    torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-6)


@cuda
def test_two_ranks_share_one_gpu(tmp_path_factory):
    """Two ranks on one GPU under mpirun: bit-identical parameters on both, equal to the CPU run's."""
    results = run_cases(2, "check_cuda.py", tmp_path_factory)
    for topology, compression in cuda_train.COMBINATIONS:
        assert_case(results, f"{topology}-{compression}")
