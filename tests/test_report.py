"""`python -m vsdjax.report DIR`: a finished run, a run still going, a chain, no run."""

import json
import os
import shutil

import imageio.v3 as iio
import numpy as np
import pytest

from vsdjax import report
from vsdjax.reporting import plots, sheet

_3D_PLOTS = ("losses.png", "grad_norms.png", "t.png", "phi_loss.png")


def test_report_of_a_finished_run(tiny_run, capsys):
  workdir = tiny_run[0]
  assert report.main([workdir]) == 0
  out = os.path.join(workdir, "report")
  assert sorted(os.listdir(out)) == sorted(_3D_PLOTS + ("exports.png",))
  assert capsys.readouterr().out.split() == [os.path.join(out, n) for n in _3D_PLOTS] + [
    os.path.join(out, "exports.png")
  ]
  sheet_png = iio.imread(os.path.join(out, "exports.png"))
  assert sheet_png.ndim == 3 and min(sheet_png.shape[:2]) > 50
  # Rows are the particles' folders; each holds its one view (export.views = 1).
  views = sheet.particle_views(os.path.join(workdir, "final"))
  assert [[os.path.basename(v) for v in row] for row in views] == [["view_00.png"]] * 2


def test_report_of_a_run_still_going(tiny_run, tmp_path):
  # Three lines and half of a fourth being written; no final/ yet.
  with open(os.path.join(tiny_run[0], "metrics.jsonl")) as f:
    lines = f.read().splitlines()
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:3] + [lines[3][:20]]))
  assert len(plots.read_metrics(str(tmp_path / "metrics.jsonl"))) == 3
  assert report.main([str(tmp_path)]) == 0
  assert sorted(os.listdir(tmp_path / "report")) == sorted(_3D_PLOTS)
  (tmp_path / "metrics.jsonl").write_text("\n".join([lines[0], "{", lines[1]]))
  with pytest.raises(ValueError, match="line 2 is not JSON"):
    plots.read_metrics(str(tmp_path / "metrics.jsonl"))


def test_report_of_a_chain_with_a_2d_stage(tiny_run, tmp_path):
  shutil.copytree(tiny_run[0], tmp_path / "stage1", ignore=shutil.ignore_patterns("report"))
  stage2 = tmp_path / "stage2"  # A 2D run (its spread against sigma_ref) that is going on.
  (stage2 / "final" / "particle_0").mkdir(parents=True)
  (stage2 / "config.json").write_text(json.dumps({"prior": {"sigma_ref": 0.1}}))
  records = [{"step": s, "loss": 1.0 / s, "particle_spread": 0.1 - 0.05 / s} for s in range(1, 60)]
  (stage2 / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  iio.imwrite(stage2 / "final" / "particle_0" / "image.png", np.zeros((8, 8, 3), np.uint8))
  assert report.main([str(tmp_path)]) == 0
  assert sorted(os.listdir(tmp_path / "report")) == ["stage1", "stage2"]
  assert sorted(os.listdir(tmp_path / "report" / "stage1")) == sorted(_3D_PLOTS + ("exports.png",))
  assert sorted(os.listdir(tmp_path / "report" / "stage2")) == [
    "exports.png",
    "losses.png",
    "spread.png",
  ]


def test_report_of_a_folder_without_a_run(tmp_path, capsys):
  assert report.main([str(tmp_path)]) == 2
  assert "holds no run" in capsys.readouterr().err
