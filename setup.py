"""hvd_distef: dist-EF-BlockSGDM for Horovod/MPI and PyTorch."""
from setuptools import find_packages, setup

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
)
