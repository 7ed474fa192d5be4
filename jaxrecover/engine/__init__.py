"""The batch engine: chunks, micro-batches, automatic sizes, sharding, multi-process runs, progress."""

from .batch import (chunk_length, check_finite, check_finite_params, check_input_dtype, check_targets, convergence_delta, explain,
                    map_chunks, pad_chunk, vmap_in_micro_batches)
from .devices import (agreed, allgather_float64, data_parallel, local_rows, max_over_processes, place,
                      process_share, spans_processes)
from .sizing import auto_chunk_size, auto_micro_batch, forward_bytes

__all__ = [
    "explain", "convergence_delta", "map_chunks", "chunk_length", "pad_chunk", "vmap_in_micro_batches",
    "check_input_dtype", "check_targets", "check_finite", "check_finite_params",
    "data_parallel", "spans_processes", "place", "local_rows", "process_share", "allgather_float64", "agreed",
    "max_over_processes",
    "forward_bytes", "auto_chunk_size", "auto_micro_batch",
]
