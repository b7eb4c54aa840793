"""The largest costs of a compiled program, from a JAX profiler trace.

`profile(compiled, run, runs)` traces `runs` calls of run() (jax.profiler, with
its Perfetto trace), sums the duration of every XLA operation (trace events
that carry an `hlo_op`: the device's kernels where the trace has a device
process, "/device:GPU:0" or a TPU; else XLA:CPU's thunks on the host threads),
and names each operation by its JAX source: the `op_name` of its metadata in
the compiled HLO (e.g. "jit(step_fn)/transpose(jvp(FlaxUNet2DConditionModel))/
down_blocks_0/..."), so that a reader sees which part of the step an
operation belongs to. Operations that run concurrently on several streams or
threads are each counted, so the shares are of summed operation time.
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile

import jax

# `%name = type op(...), ..., metadata={op_name="..." ...}` lines of HLO text.
_METADATA = re.compile(
  r'^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?metadata=\{[^}\n]*?op_name="([^"]*)"', re.M
)
# Transformation wrappers of a name-stack component: vmap(...), jvp(...), ...
_WRAPPER = re.compile(r"^(\w+)\((.*)\)$")
_TRANSFORMS = ("vmap", "jvp", "transpose", "remat", "pjit")
# Name-stack components of control flow and rematerialisation, not of a part.
_PLUMBING = ("cond", "while", "body", "closed_call", "checkpoint", "rematted_computation")


def op_names(compiled) -> dict:
  """{HLO instruction name: the JAX op_name of its metadata} of a jax Compiled."""
  return dict(_METADATA.findall(compiled.as_text()))


def scope(op_name: str) -> str:
  """The part of the program an op_name belongs to.

  Its first name-stack component below the jit that names something, stripped
  of transformation wrappers, with " (backward)" where a transpose wraps any
  ("render (backward)", "eps_phi_update", ...: the train step's named scopes);
  "(no metadata)" for an operation whose op_name is unknown.
  """
  if not op_name:
    return "(no metadata)"
  parts = op_name.split("/")
  if parts and parts[0].startswith("jit("):
    parts = parts[1:]
  name = ""
  for part in parts:
    while (m := _WRAPPER.match(part)) and m.group(1) in _TRANSFORMS:
      part = m.group(2)
    if part and part not in _PLUMBING and not re.fullmatch(r"branch_\d+_fun|jit\(.*\)", part):
      name = part
      break
  return name + (" (backward)" if "transpose(" in op_name else "")


def _trace_events(folder: str) -> list:
  paths = glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True)
  if not paths:
    raise FileNotFoundError(f"no perfetto_trace.json.gz under {folder}")
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    trace = json.load(f)
  return trace["traceEvents"] if isinstance(trace, dict) else trace


def op_durations(events: list) -> collections.Counter:
  """{hlo_op: summed microseconds} of the XLA operations of a trace's events."""
  processes = {
    e["pid"]: e["args"]["name"]
    for e in events
    if e.get("ph") == "M" and e.get("name") == "process_name"
  }
  devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
  totals = collections.Counter()
  for e in events:
    if e.get("ph") != "X" or "hlo_op" not in e.get("args", {}):
      continue
    if devices and e["pid"] not in devices:
      continue  # Host-side launches of the device's kernels.
    totals[e["args"]["hlo_op"]] += e.get("dur", 0.0)
  return totals


def profile(compiled, run, runs: int, top: int = 12) -> dict:
  """Traces `runs` calls of run() (each must block until its results are ready).

  Returns {runs, op_ms_per_run (summed operation time), top: [{hlo_op, ms,
  share, op_name}] of the `top` costliest operations, scopes: [{scope, ms,
  share}] of the `top` costliest parts (see `scope`)}, times per run.
  """
  with tempfile.TemporaryDirectory() as folder:
    with jax.profiler.trace(folder, create_perfetto_trace=True):
      for _ in range(runs):
        run()
    totals = op_durations(_trace_events(folder))
  names = op_names(compiled)
  total = sum(totals.values())
  if not total:
    raise ValueError("the trace holds no XLA operation (no event with an hlo_op)")
  per_run = lambda us: round(us / runs / 1000, 3)
  scopes = collections.Counter()
  for op, us in totals.items():
    scopes[scope(names.get(op, ""))] += us
  return {
    "runs": runs,
    "op_ms_per_run": per_run(total),
    "top": [
      {
        "hlo_op": op,
        "ms": per_run(us),
        "share": round(us / total, 4),
        "op_name": names.get(op, ""),
      }
      for op, us in totals.most_common(top)
    ],
    "scopes": [
      {"scope": s, "ms": per_run(us), "share": round(us / total, 4)}
      for s, us in scopes.most_common(top)
    ],
  }
