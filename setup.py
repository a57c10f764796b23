"""hvd_distef: dist-EF-BlockSGDM for Horovod/MPI and PyTorch.

The compiled kernels in cpp_ops/ are built when torch is importable at build time (install with
--no-build-isolation, as scripts/install.sh does). HVD_DISTEF_DEBUG=1 builds them with -O0 -g;
HVD_DISTEF_NO_EXT=1 skips them (the pure-PyTorch path is used).
"""
import glob
import os

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
if os.environ.get("HVD_DISTEF_NO_EXT", "0") in ("", "0"):
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("hvd_distef: torch is not importable at build time; building without cpp_ops")
    else:
        debug = os.environ.get("HVD_DISTEF_DEBUG", "0") not in ("", "0")
        flags = ["-O0", "-g"] if debug else ["-O3"]
        # -ffp-contract=off: p = d + r*e rounds like the torch path (no fused multiply-add)
        flags += ["-fopenmp", "-ffp-contract=off", "-std=c++17"]
        ext_modules = [CppExtension("hvd_distef._cpp_ops", sorted(glob.glob("cpp_ops/*.cpp")),
                                    extra_compile_args=flags, extra_link_args=["-fopenmp"])]
        cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=False)}

setup(
    name="hvd_distef",
    version="0.1.0",
    description="Two-way compressed gradients with error feedback and Nesterov momentum for Horovod/MPI",
    packages=find_packages(include=["hvd_distef", "hvd_distef.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "numpy", "mpi4py>=3.1"],
    extras_require={"train": ["tqdm", "matplotlib", "scikit-learn"]},
    entry_points={"console_scripts": ["hvd-distef-train=hvd_distef.train.cli:main",
                                      "hvd-distef-report=hvd_distef.report:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
