"""`python -m vsdjax.report DIR`: a finished run, a run still going, a chain, no run."""

import json
import os
import shutil

import imageio.v3 as iio
import numpy as np
import pytest

from vsdjax import report
from vsdjax.reporting import plots, sheet

# The tiny run's plots (2D with SDS: the spread, no eps_phi).
_PLOTS = ("losses.png", "grad_norms.png", "t.png", "spread.png")


def test_report_of_a_finished_run(tiny_run, capsys):
  workdir = tiny_run[0]
  assert report.main([workdir]) == 0
  out = os.path.join(workdir, "report")
  assert sorted(os.listdir(out)) == sorted(_PLOTS + ("exports.png",))
  assert capsys.readouterr().out.split() == [os.path.join(out, n) for n in _PLOTS] + [
    os.path.join(out, "exports.png")
  ]
  sheet_png = iio.imread(os.path.join(out, "exports.png"))
  assert sheet_png.ndim == 3 and min(sheet_png.shape[:2]) > 50
  # Rows are the particles' folders; each holds its image.
  views = sheet.particle_views(os.path.join(workdir, "final"))
  assert [[os.path.basename(v) for v in row] for row in views] == [["image.png"]] * 2


def test_report_of_a_run_still_going(tiny_run, tmp_path):
  # Three lines and half of a fourth being written; no final/ yet.
  with open(os.path.join(tiny_run[0], "metrics.jsonl")) as f:
    lines = f.read().splitlines()
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:3] + [lines[3][:20]]))
  assert len(plots.read_metrics(str(tmp_path / "metrics.jsonl"))) == 3
  assert report.main([str(tmp_path)]) == 0
  assert sorted(os.listdir(tmp_path / "report")) == sorted(_PLOTS)
  (tmp_path / "metrics.jsonl").write_text("\n".join([lines[0], "{", lines[1]]))
  with pytest.raises(ValueError, match="line 2 is not JSON"):
    plots.read_metrics(str(tmp_path / "metrics.jsonl"))


def test_report_of_a_chain(tiny_run, tmp_path):
  shutil.copytree(tiny_run[0], tmp_path / "stage1", ignore=shutil.ignore_patterns("report"))
  # A 3D VSD stage going on: eps_phi's loss, a particle band, 11 views and a texture atlas.
  stage2 = tmp_path / "stage2"
  views = stage2 / "final" / "particle_0" / "views"
  views.mkdir(parents=True)
  records = [
    {"step": s, "loss": 1 / s, "phi_loss": 0.5, "t": 0.5, "t_max": 0.98}
    | {"particle_grad_norm" + k: v / s for k, v in (("", 2), ("_min", 1), ("_max", 3))}
    for s in range(1, 60)
  ]
  (stage2 / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  for k in range(11):
    iio.imwrite(views / f"view_{k}.png", np.full((300, 200, 3), 20 * k, np.uint8))
  iio.imwrite(stage2 / "final" / "particle_0" / "texture.png", np.zeros((4, 4, 3), np.uint8))
  (stage2 / "final" / "eval.json").write_text(
    json.dumps({"particles": [{"nearest": "sphere", "psnr": 25.0}]})
  )
  assert report.main([str(tmp_path)]) == 0
  assert sorted(os.listdir(tmp_path / "report")) == ["stage1", "stage2"]
  assert sorted(os.listdir(tmp_path / "report" / "stage1")) == sorted(_PLOTS + ("exports.png",))
  assert sorted(os.listdir(tmp_path / "report" / "stage2")) == [
    "exports.png",
    "grad_norms.png",
    "losses.png",
    "phi_loss.png",
    "t.png",
  ]
  (row,) = sheet.particle_views(str(stage2 / "final"))  # Numbered in order, no atlas.
  assert [os.path.basename(v) for v in row] == [f"view_{k}.png" for k in range(11)]
  assert sheet._labels(str(stage2 / "final"), 1) == ["particle 0\nsphere 25.0 dB"]


def test_report_of_a_folder_without_a_run(tmp_path, capsys):
  assert report.main([str(tmp_path)]) == 2
  assert "holds no run" in capsys.readouterr().err
