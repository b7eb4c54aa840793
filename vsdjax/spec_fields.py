"""Type checks of the frozen settings dataclasses (GridSpec, FieldSpec)."""
import math

import numpy as np


def coerce(spec, ints=(), floats=()) -> None:
  """Checks and normalises fields of a frozen dataclass in place.

  `ints` must be integers (not bools) and become Python ints; `floats` must
  convert to finite Python floats. Errors name the class and the field, as
  "GridSpec.n_levels must be an integer, got 2.5".
  """
  cls = type(spec).__name__
  for name in ints:
    value = getattr(spec, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise ValueError(f"{cls}.{name} must be an integer, got {value!r}")
    object.__setattr__(spec, name, int(value))
  for name in floats:
    value = getattr(spec, name)
    try:
      value = float(value)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{cls}.{name} must be a number, got {value!r}") from e
    if not math.isfinite(value):
      raise ValueError(f"{cls}.{name} must be finite, got {value!r}")
    object.__setattr__(spec, name, value)
