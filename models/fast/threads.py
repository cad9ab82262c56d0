"""Cache-sized chunks of rows, worked through on torch's threads, for the memory-bound CPU paths;
and whether the CPU has the bfloat16 instructions those paths would need for bf16."""
import functools
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

# Kept for the process: starting threads on every call cost the small VQ-VAE a tenth of its step
# (bench/README.md).
_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _pool(threads: int) -> ThreadPoolExecutor:
    with _pools_lock:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="rows")
        return _pools[threads]


def row_chunks(rows: int, chunk_rows: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_rows, rows)) for start in range(0, rows, chunk_rows)]


def run_on_threads(work, chunks: list[tuple[int, int]], device: torch.device) -> list:
    """work(chunks) on as many Python threads as torch has intra-op threads, a contiguous share each.

    Each op on a cache-sized chunk is too small to split across threads well, and an op split
    across threads waits at its end for the slowest: on a busy machine, for a thread the scheduler
    has put aside. One single-threaded share per thread meets only once, at the end.
    """
    caller_threads = torch.get_num_threads()
    threads = min(caller_threads, len(chunks)) if device.type == "cpu" else 1
    if threads < 2:
        with torch.no_grad():
            return [work(chunks)]
    shares = [chunks[len(chunks) * i // threads:len(chunks) * (i + 1) // threads] for i in range(threads)]
    inference = torch.is_inference_mode_enabled()

    def single_threaded(share):
        torch.set_num_threads(1)  # this thread's OpenMP, but MKL's setting is process-wide...
        # Grad and inference mode are per thread and a new thread starts with neither: outside
        # the caller's inference mode, writing into tensors it made there is refused.
        with torch.inference_mode(inference), torch.no_grad():
            return work(share)

    try:
        return list(_pool(threads).map(single_threaded, shares))
    finally:
        torch.set_num_threads(caller_threads)  # ...so put it back for the caller


@functools.cache
def cpu_has_bfloat16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX-512 BF16, AMX) that oneDNN uses. Without
    them a bfloat16 matrix product falls back to scalar code, hundreds of times slower than float32
    (bench/README.md)."""
    supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(supported and torch.backends.mkldnn.is_available() and supported())
