"""XLA's memory analysis of a compiled program, in bytes, and a timed run, for the benchmarks."""

import statistics
import time

import jax

_GIB = 2.0**30


def memory(compiled, shared: int = 0) -> dict:
  """Memory of `compiled` (a jax Compiled): XLA's analysis plus the device peak.

  Returns {arguments, outputs, alias (donated buffers reused by outputs),
  temp, generated_code, shared, total, total_gib} and, where the device
  reports it (GPUs, TPUs), peak_bytes_in_use: a process-wide peak. total =
  arguments + outputs - alias + temp + generated_code - shared, where
  `shared` is the bytes of arguments passed twice but one buffer at run time
  (the UNet params of a prior that eps_phi shares).
  """
  m = compiled.memory_analysis()
  out = {
    "arguments": m.argument_size_in_bytes,
    "outputs": m.output_size_in_bytes,
    "alias": m.alias_size_in_bytes,
    "temp": m.temp_size_in_bytes,
    "generated_code": m.generated_code_size_in_bytes,
    "shared": shared,
  }
  out["total"] = (
    out["arguments"] + out["outputs"] - out["alias"] + out["temp"] + out["generated_code"] - shared
  )
  out["total_gib"] = round(out["total"] / 2.0**30, 3)
  stats = jax.devices()[0].memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    out["peak_bytes_in_use"] = stats["peak_bytes_in_use"]
  return out


def run_info(repeats: int) -> dict:
  """The fields every result row of a run carries: device, backend, jax version, repeats."""
  return {
    "device": jax.devices()[0].device_kind,
    "backend": jax.default_backend(),
    "jax": jax.__version__,
    "repeats": repeats,
  }


def measure(fn, args, repeats: int, warmup: int, max_temp_gib) -> dict:
  """Compiles jit(fn) for args; unless too big, times it (median seconds)."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  result = {"compile_s": round(time.perf_counter() - start, 2)}
  temp_gib = compiled.memory_analysis().temp_size_in_bytes / _GIB
  if max_temp_gib is not None and temp_gib > max_temp_gib:
    result.update(
      seconds=None, memory=memory(compiled), skipped=f"temp {temp_gib:.2f} GiB > --max-temp-gib"
    )
    return result
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  result.update(seconds=statistics.median(times), memory=memory(compiled))
  return result
