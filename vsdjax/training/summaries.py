"""TensorBoard event files in the work directory (tensorboardX): `tensorboard --logdir DIR`.

What a run segment writes to DIR/events.out.tfevents.<time>.<host>.step<s>, s the
step it starts from (process 0 only, sharding.is_writer):
  scalars   every field of each metrics.jsonl line but 'step', under its own
            name, at that line's step (metrics.jsonl itself is unchanged)
  images    'previews': each preview grid (training/previews.py), at its step
  text      'config': the segment's resolved config as JSON, at its first step

A resumed segment opens a new event file whose first event purges, in
TensorBoard's reading, the events that an interrupted segment wrote past the
restored step (as the trainer drops those metrics.jsonl lines). Events are
flushed as they are written, so TensorBoard follows the run as it goes.
"""

import json

import numpy as np
import tensorboardX

from vsdjax.representations.nerf import export
from vsdjax.training import sharding


class Writer:
  """The event writer of one run segment; on processes other than 0 it writes nothing.

  A context manager: leaving it closes the event file.
  """

  def __init__(self, config, workdir: str, start: int = 0):
    """Opens an event file in `workdir` for a segment starting after step `start`."""
    self._writer = None
    if not sharding.is_writer():
      return
    self._writer = tensorboardX.SummaryWriter(
      workdir,
      purge_step=start + 1 if start else None,
      # tensorboardX names files by the second, and truncates one of the same name.
      filename_suffix=f".step{start}",
    )
    text = json.dumps(json.loads(config.to_json_best_effort()), indent=2)
    # Indented lines: TensorBoard shows the text as markdown, and this as code.
    self._writer.add_text("config", "\n".join("    " + l for l in text.splitlines()), start)
    self._writer.flush()

  def scalars(self, record: dict) -> None:
    """One metrics.jsonl record {'step': s, name: number, ...}."""
    if self._writer is None:
      return
    step = record["step"]
    for name, value in record.items():
      if name != "step":
        self._writer.add_scalar(name, value, step)
    self._writer.flush()

  def image(self, tag: str, step: int, image: np.ndarray) -> None:
    """image [H, W, 3] in [0, 1]."""
    if self._writer is None:
      return
    self._writer.add_image(tag, export.to_uint8(image), step, dataformats="HWC")
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
