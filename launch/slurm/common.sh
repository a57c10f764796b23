# Sourced by the sbatch scripts: where the project and its Python are, and OpenMPI's root opt-in.
HVD_DISTEF_HOME=${HVD_DISTEF_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
PYTHON=${PYTHON:-$HVD_DISTEF_HOME/.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi
cd "$HVD_DISTEF_HOME"
