"""CPU kernels from kernels.cpp, compiled on first use by torch.utils.cpp_extension and cached on
disk, for what torch's own ops do in several passes over memory.

The quantiser's nearest code is one: torch writes every distance of a block of latents out
(`addmm`) and reads them back for a one-value-at-a-time `argmin`; the kernel keeps each block of
distances in registers. BatchNorm in training mode and the ReLU after it are another
(models/fast/batchnorm.py: `_BatchNormReLU`). Where the kernels cannot be built (no C++ compiler, no
ninja), `available()` is False after one warning, and callers use torch's ops;
PIXEL_VQVAE_KERNELS=0 makes it False without a build.
"""
import functools
import logging
import os
import shutil
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.cpp")
LANES = 16  # float32 lanes of the kernels' vectors: a codebook's size must be a multiple of it
# The instructions torch itself dispatches to on this CPU; built for each separately, so a cache
# shared between machines never runs one's build on the other.
ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
_lock = threading.Lock()


def _put_ninja_on_path() -> None:
    """torch runs `ninja` from PATH; the one requirements.txt installs lies beside the virtual
    environment's Python, off PATH when the scripts run as `.venv/bin/python train_*.py`."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _without_cuda_notice(record: logging.LogRecord) -> bool:
    # torch.utils.cpp_extension logs "No CUDA runtime is found, using CUDA_HOME=..." as it is
    # imported on a machine with a CUDA toolkit and no GPU; these kernels are CPU code.
    return not record.getMessage().startswith("No CUDA runtime is found")


@functools.cache
def _build() -> bool:
    if os.environ.get("PIXEL_VQVAE_KERNELS", "1") == "0":
        return False
    logging.getLogger("torch.utils.cpp_extension").addFilter(_without_cuda_notice)
    from torch.utils.cpp_extension import load

    _put_ninja_on_path()
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        # -ffp-contract=fast: multiply-adds as one instruction (ISO C++ mode turns that off);
        # -fopenmp: without it at::parallel_for runs on the calling thread alone.
        load(name=f"pixel_vqvae_kernels_{capability.lower()}", sources=[str(SOURCE)],
             extra_cflags=["-O3", "-ffp-contract=fast", "-fopenmp", *ISA_FLAGS.get(capability, [])],
             extra_ldflags=["-fopenmp"], is_python_module=False)
    except (RuntimeError, OSError, ImportError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        warnings.warn(f"the CPU kernels of {SOURCE.name} could not be built ({reason}); using torch's "
                      "ops instead, which train the plain VQ-VAE about a fifth slower", stacklevel=3)
        return False
    return True


def available() -> bool:
    """Whether the kernels are built and loaded in this process (building them the first time).
    False while torch.compile traces a model: it compiles torch's ops itself."""
    if torch.compiler.is_compiling():
        return False
    with _lock:
        return _build()


def nearest_code(x: torch.Tensor, codebook: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """argmin over codes of ||e||^2 - 2 x.e for each row of float32 x [R, D], with codebook [K, D]
    and norms = ||e||^2 [K], K a multiple of LANES; the first of equal minima, NaN as a minimum."""
    # Scaling by -2 is exact, so each distance is what addmm(norms, x, codebook.t(), alpha=-2)
    # sums, in another order.
    return torch.ops.pixel_vqvae.nearest_code(x, (codebook * -2).t().contiguous(), norms)
