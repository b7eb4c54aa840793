"""notebooks/quickstart.ipynb: its Python parses, and its config cells set
only fields that the configs have (a typo would otherwise add a new field
that nothing reads, silently)."""

import ast
import json
import os

from vsdjax import defaults, train

NOTEBOOK = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks", "quickstart.ipynb"
)


def code_cells() -> list:
  """Python of each code cell, shell (!) and magic (%) lines dropped."""
  with open(NOTEBOOK) as f:
    cells = json.load(f)["cells"]
  return [
    "\n".join(
      line for line in "".join(c["source"]).splitlines() if not line.lstrip().startswith(("!", "%"))
    )
    for c in cells
    if c["cell_type"] == "code"
  ]


def field_paths(config, prefix=()) -> set:
  """Dotted paths of every leaf field of a ConfigDict."""
  paths = set()
  for name, value in config.items():
    if hasattr(value, "items"):
      paths |= field_paths(value, prefix + (name,))
    else:
      paths.add(".".join(prefix + (name,)))
  return paths


def test_cells_parse():
  cells = code_cells()
  assert len(cells) >= 4
  for cell in cells:
    ast.parse(cell)


def test_config_cells_set_existing_fields(monkeypatch):
  configs = []
  monkeypatch.setattr(train, "train_and_evaluate", lambda config, workdir: configs.append(config))
  namespace = {}
  for cell in code_cells():
    if "get_config()" in cell:  # Run the config cells, training stubbed out.
      cell = cell.replace("# state = train.", "state = train.")
      exec(compile(cell, NOTEBOOK, "exec"), namespace)  # pylint: disable=exec-used
  assert len(configs) == 2  # The analytic toy and Stable Diffusion.
  known = field_paths(defaults.get_config())
  for config in configs:
    assert field_paths(config) <= known, field_paths(config) - known
  assert configs[0].n_particles == 4 and configs[0].scene.albedo_init_std > 0
