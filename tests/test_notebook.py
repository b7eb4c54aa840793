"""Every notebook in notebooks/ runs top to bottom at tiny size, in a python3 kernel.

A notebook's first code cell is tagged "parameters" (papermill's convention):
the test inserts a cell after it that overrides the steps, sizes and work
directory (colab_vsd.ipynb gets a tiny Stable Diffusion that the test builds
and saves, quickstart and paper_2d keep the analytic prior), executes the
notebook with nbclient, and checks the work directory's files and that every
figure cell (one that calls plt.show()) produced a PNG.
"""

import asyncio
import glob
import json
import os

import nbclient
import nbformat
import pytest

import tiny_sd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(
  os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb"))
)

# Config fields (OVERRIDES) that make a 3D run tiny: a few rays and samples in one plain render
# (no occupancy grid, no ray batches: less to compile), a tiny hash grid, no previews, small
# exports.
TINY_3D = {
  "scene.n_levels": 2,
  "scene.log2_table_size": 8,
  "scene.hidden": 8,
  "render.n_samples": 8,
  "render.chunk": 8,
  "render.occupancy_grid": 0,
  "render.ray_batch": 0,
  "log_every": 1,
  "preview_every": 0,
  "export.views": 2,
  "export.video_frames": 2,
  "export.resolution": 16,
  "export.mesh_resolution": 16,
  "export.eval_views": 2,
}
TINY_ANALYTIC = {
  "eps_phi.tiny_channels": (64,),
  "render.resolution": 8,
  "render.resolution_after": 8,
}


def build_small_sd(folder: str) -> str:
  """A smaller tiny SD than tiny_sd's fixtures (one UNet level, a 2x VAE: 16x16 images, the
  render size), whose VSD step compiles in about half the time; returns its folder."""
  with pytest.MonkeyPatch.context() as m:
    for config, changes in (
      (
        tiny_sd.UNET_CONFIG,
        {
          "sample_size": 8,
          "block_out_channels": (32,),
          "down_block_types": ("CrossAttnDownBlock2D",),
          "up_block_types": ("CrossAttnUpBlock2D",),
          "attention_head_dim": (2,),
        },
      ),
      (
        tiny_sd.VAE_CONFIG,
        {
          "block_out_channels": (32, 32),
          "down_block_types": ("DownEncoderBlock2D",) * 2,
          "up_block_types": ("UpDecoderBlock2D",) * 2,
        },
      ),
    ):
      for key, value in changes.items():
        m.setitem(config, key, value)
    return tiny_sd.build_tiny_sd(folder).path


async def execute(name: str, parameters: dict) -> nbformat.NotebookNode:
  """Runs notebooks/`name` with `parameters` set after its parameters cell; returns it run.

  Raises nbclient's CellExecutionError (with the cell's traceback) if a cell fails.
  """
  nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
  tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, f"{name}: one cell tagged 'parameters', got {len(tagged)}"
  source = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
  nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(source))
  client = nbclient.NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": ROOT}}
  )
  await client.async_execute(env=dict(os.environ, JAX_PLATFORMS="cpu"))
  return nb


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
  """{notebook: (the executed notebook, or the error it raised; its work directory)}.

  The notebooks run at the same time, a kernel each: they spend their time compiling, on one
  core each, so on two cores this takes about half as long as one after the other.
  """
  work = {name: tmp_path_factory.mktemp(name.removesuffix(".ipynb")) for name in NOTEBOOKS}
  parameters = {
    # SDS: its step compiles in half the time of VSD's, which the other two notebooks run.
    "quickstart.ipynb": dict(
      N_PARTICLES=2, STEPS=2, OVERRIDES={**TINY_3D, **TINY_ANALYTIC, "guidance.mode": "sds"}
    ),
    "paper_2d.ipynb": dict(
      STEPS=2,
      SIGMA_REFS=(0.1,),
      N_PARTICLES=3,
      OVERRIDES={**TINY_ANALYTIC, "log_every": 1, "preview_every": 0},
    ),
    "colab_vsd.ipynb": dict(
      PRIOR=build_small_sd(str(tmp_path_factory.mktemp("small_sd"))),
      STEPS=2,
      MESH_STAGES=False,
      OVERRIDES={
        **TINY_3D,
        "render.resolution": 16,
        "render.resolution_after": 16,
        # The softplus blob peaks at density 10: after 2 steps nothing reaches the default 25.
        "export.mesh_threshold": 5.0,
      },
    ),
  }

  async def run_all():
    return await asyncio.gather(
      *(execute(name, dict(WORKDIR=str(work[name]), **parameters[name])) for name in NOTEBOOKS),
      return_exceptions=True,
    )

  return {name: (nb, work[name]) for name, nb in zip(NOTEBOOKS, asyncio.run(run_all()))}


def executed(runs, name):
  """(executed notebook, work directory) of `name`; re-raises the error its run raised."""
  nb, workdir = runs[name]
  if isinstance(nb, BaseException):
    raise nb
  return nb, workdir


def outputs(nb) -> list:
  return [out for c in nb.cells if c.cell_type == "code" for out in c.outputs]


def assert_figures(nb) -> None:
  """Every cell that calls plt.show() displayed a PNG."""
  cells = [c for c in nb.cells if c.cell_type == "code" and "plt.show()" in c.source]
  assert cells
  for cell in cells:
    assert any("image/png" in out.get("data", {}) for out in cell.outputs), cell.source


def test_notebooks_are_stored_clean_with_their_metadata():
  assert NOTEBOOKS == ["colab_vsd.ipynb", "paper_2d.ipynb", "quickstart.ipynb"]
  for name in NOTEBOOKS:
    nb = nbformat.read(os.path.join(ROOT, "notebooks", name), as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), name
    assert "<" not in nb.cells[1].source, "a placeholder in the settings cell"
  colab = nbformat.read(os.path.join(ROOT, "notebooks", "colab_vsd.ipynb"), as_version=4)
  assert colab.metadata.accelerator == "TPU" and colab.metadata.colab.gpuType == "V5E1"


@pytest.mark.slow
@pytest.mark.torch  # The shared run builds colab_vsd's tiny Stable Diffusion with torch.
def test_quickstart(runs):
  nb, workdir = executed(runs, "quickstart.ipynb")
  result = json.loads((workdir / "final" / "eval.json").read_text())
  assert len(result["particles"]) == 2
  assert len(list(workdir.glob("final/particle_*/views/*.png"))) == 4
  (table,) = [o.data["text/markdown"] for o in outputs(nb) if "text/markdown" in o.get("data", {})]
  assert table.count("\n| ") == 2 and "PSNR to cube" in table  # eval.json, a row per particle
  assert_figures(nb)


@pytest.mark.slow
@pytest.mark.torch
def test_paper_2d(runs):
  nb, workdir = executed(runs, "paper_2d.ipynb")
  for mode in ("sds", "vsd"):
    run = workdir / f"{mode}_sigma0.1"
    assert json.loads((run / "final" / "eval.json").read_text())["sigma_ref"] == 0.1
    assert len(list(run.glob("final/particle_*/image.png"))) == 3
  assert_figures(nb)


@pytest.mark.slow
@pytest.mark.torch
def test_colab_vsd(runs):
  nb, workdir = executed(runs, "colab_vsd.ipynb")
  final = workdir / "stage1" / "final" / "particle_0"
  assert (final / "video.mp4").stat().st_size > 0 and len(list(final.glob("views/*.png"))) == 2
  assert len((workdir / "stage1" / "metrics.jsonl").read_text().splitlines()) == 2
  assert any("<video" in out.get("data", {}).get("text/html", "") for out in outputs(nb))
  assert any(f"mesh: {final / 'mesh.obj'}" in out.get("text", "") for out in outputs(nb))
  assert_figures(nb)
