"""TPU topologies for ahead-of-time compiles on any host, TPU or not.

Accelerator names as Cloud TPU spells them (`v5p-256`, `v4-64`, `v5e-16`/`v5litepod-16`,
`v6e-8`) or a chip grid (`v5p:4x4x8`) become libtpu's topology devices, which the real TPU
compiler targets from a CPU machine (as MaxText's train_compile.py does), plus each device's HBM.
The slice is described to libtpu as MaxText describes it: the chip configuration (one 'megacore'
device per two-core v4/v5p chip), the chips one host holds, and which dimensions wrap around
(a torus), each derived from the generation and the chip grid.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

from pretrainx import platforms

# generation: (cores per chip in the accelerator name, HBM GiB per chip, grid dimensions)
GENERATIONS = {"v4": (2, 32.0, 3), "v5p": (2, 95.0, 3), "v5e": (1, 16.0, 2), "v6e": (1, 32.0, 2)}
# How TPU VMs name each generation's accelerator types, and the chips one host holds.
_TYPE_PREFIX = {"v4": "v4", "v5p": "v5p", "v5e": "v5litepod", "v6e": "v6e"}
_HOST_CHIPS = {"v4": 4, "v5p": 4, "v5e": 8, "v6e": 8}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}
MAX_CHIPS = 8192
# Slices joined over DCN that a plan may ask for. libtpu itself accepts any count (it listed
# 8000 devices for 1000 v5e-8 slices), so the bound is pretrainx's: the largest published
# multislice job used 199 slices (50,944 v5e chips), and a CPU-host compile over more than 64Ki
# devices (each collective's groups list them all) is not a plan anyone can wait for.
MAX_SLICES = 256
MAX_TOTAL_CHIPS = 65536
HOST_BOUNDS = (2, 2, 1)  # chips per host, as MaxText tells libtpu for every slice of 4+ chips
# v4/v5p slices are built of 4x4x4-chip cubes joined by optical switches: a slice of whole cubes
# is a 3-D torus. A v5e/v6e pod is one 16x16 grid: a dimension wraps where it spans the pod.
CUBE = 4
POD_EDGE = 16
INSTALL_HINT = ("the TPU compiler comes with libtpu: pip install 'pretrainx[tpu]' (or "
                "pip install 'jax[tpu]'); without it, plan with fake CPU devices (--devices=N).")


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice to compile for."""

  name: str          # as given, e.g. 'v5p-256'
  generation: str    # 'v4', 'v5p', 'v5e', 'v6e'
  grid: tuple[int, ...]  # chips per dimension, e.g. (4, 4, 8)
  devices: tuple     # libtpu's topology devices (what jax.jit compiles for), all slices'
  num_slices: int = 1  # slices of this shape joined over the data-centre network (DCN)

  @property
  def chip_config(self) -> str:
    return chip_config(self.generation)

  @property
  def host_bounds(self) -> tuple[int, int, int]:
    return host_bounds(self.grid)

  @property
  def wrap(self) -> tuple[bool, bool, bool]:
    return wraparound(self.generation, self.grid)

  def describe(self) -> str:
    """'v5p:4x4x8 megacore, hosts 2x2x1, wrap xyz' (what libtpu was told)."""
    axes = "".join(a for a, w in zip("xyz", self.wrap) if w) or "none"
    slices = f", {self.num_slices} slices over DCN" if self.num_slices > 1 else ""
    return (f"{self.topology_name} {self.chip_config}, hosts "
            f"{'x'.join(map(str, self.host_bounds))}, wrap {axes}{slices}")

  @property
  def chips(self) -> int:
    """Chips of one slice."""
    return math.prod(self.grid)

  @property
  def hbm_gib_per_device(self) -> float:
    """HBM of one JAX device (a chip, or one core where libtpu lists cores)."""
    return GENERATIONS[self.generation][1] * self.chips * self.num_slices / len(self.devices)

  @property
  def topology_name(self) -> str:
    return f"{self.generation}:{'x'.join(map(str, self.grid))}"


def chip_grid(chips: int, dims: int) -> tuple[int, ...]:
  """The standard slice shape of `chips` chips: 3-D tori for v4/v5p (4 -> 2x2x1, 8 -> 2x2x2,
  256 -> 4x8x8), 2-D for v5e/v6e (4 -> 2x2, 8 -> 2x4, 256 -> 16x16)."""
  grid = [1] * dims
  if dims == 3 and chips >= 4:
    grid, left = [2, 2, 1], chips // 4
  else:
    left = chips
  while left > 1:
    small = min(grid)
    i = max(j for j, g in enumerate(grid) if g == small)  # ties: the last dimension grows
    grid[i] *= 2
    left //= 2
  return tuple(grid)


def chip_config(gen: str) -> str:
  """libtpu's chip configuration: 'megacore' (a two-core v4/v5p chip is one device) or
  'default' (one core per chip: v5e, v6e)."""
  return "megacore" if GENERATIONS[gen][0] > 1 else "default"


def _grid3(grid: tuple[int, ...]) -> tuple[int, int, int]:
  return tuple(grid) + (1,) * (3 - len(grid))  # type: ignore[return-value]


def host_bounds(grid: tuple[int, ...]) -> tuple[int, int, int]:
  """Chips per host in each dimension: 2x2x1, or the slice itself where it is smaller (a v5e-1
  is one host of 1x1x1)."""
  return tuple(min(g, h) for g, h in zip(_grid3(grid), HOST_BOUNDS))  # type: ignore[return-value]


def wraparound(gen: str, grid: tuple[int, ...]) -> tuple[bool, bool, bool]:
  """Which dimensions of the slice are rings. v4/v5p: all three once the slice is made of whole
  4x4x4 cubes (64 chips and up), none before. v5e/v6e: a dimension that spans the 16-chip pod
  edge (16x16: x and y; 8x16: y); the third dimension never."""
  g = _grid3(grid)
  if GENERATIONS[gen][2] == 3:
    return (all(d % CUBE == 0 for d in g),) * 3  # type: ignore[return-value]
  return (g[0] >= POD_EDGE, g[1] >= POD_EDGE, False)


def example_names() -> list[str]:
  return ["v4-8", "v4-64", "v5p-8", "v5p-256", "v5e-1", "v5e-16", "v5litepod-256", "v6e-8",
          "v6e-256", "v5p:4x4x8", "v6e:16x16"]


def _bad(name: str, why: str) -> ValueError:
  gens = ", ".join(sorted(GENERATIONS) + sorted(ALIASES))
  return ValueError(f"unknown TPU topology {name!r}: {why}. Name an accelerator type "
                    f"GENERATION-N ({gens}; N counts cores on v4/v5p and chips on v5e/v6e, a "
                    f"power of two) or a chip grid GENERATION:AxBxC, e.g. "
                    f"{', '.join(example_names())}.")


def parse(name: str) -> tuple[str, tuple[int, ...]]:
  """(generation, chip grid) of an accelerator type or grid name."""
  m = re.fullmatch(r"([a-z0-9]+?)([-:])(.+)", name.strip().lower())
  if not m:
    raise _bad(name, "expected GENERATION-N or GENERATION:AxBxC")
  gen = ALIASES.get(m.group(1), m.group(1))
  if gen not in GENERATIONS:
    raise _bad(name, f"no TPU generation {m.group(1)!r}")
  per_chip, _, dims = GENERATIONS[gen]
  if m.group(2) == ":":
    if not re.fullmatch(r"\d+(x\d+)*", m.group(3)):
      raise _bad(name, f"{m.group(3)!r} is not a chip grid like 4x4x8")
    grid = tuple(int(x) for x in m.group(3).split("x"))
    if len(grid) != dims or min(grid) < 1:
      raise _bad(name, f"{gen} slices are {dims}-D grids")
    return gen, grid
  if not m.group(3).isdigit():
    raise _bad(name, f"{m.group(3)!r} is not a number of {'cores' if per_chip > 1 else 'chips'}")
  n = int(m.group(3))
  chips = n // per_chip
  if n % per_chip or chips < 1 or chips & (chips - 1) or chips > MAX_CHIPS or (
      dims == 3 and chips < 4):
    raise _bad(name, f"{gen} has no slice of {n} {'cores' if per_chip > 1 else 'chips'}")
  return gen, chip_grid(chips, dims)


def libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def _describe_this_host_to_libtpu(gen: str, grid: tuple[int, ...]) -> None:
  """On a host without TPU chips, libtpu asks the GCE metadata server what this host is and
  prints a page of errors when none answers. It is told instead that this is one host of the
  target slice (the whole slice when that fits on one host), which is what a host of the target
  would be told: the compiled program is the same."""
  if platforms.tpu_chips_attached() > 0:
    return
  chips = min(math.prod(grid), _HOST_CHIPS[gen])
  per_chip = GENERATIONS[gen][0]
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{_TYPE_PREFIX[gen]}-{chips * per_chip}")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")


def check_num_slices(name: str, chips: int, num_slices: int) -> None:
  """ValueError unless `num_slices` slices of `chips` chips are a multislice pretrainx plans."""
  most = max(1, min(MAX_SLICES, MAX_TOTAL_CHIPS // chips))
  if isinstance(num_slices, bool) or not isinstance(num_slices, int) or not (
      1 <= num_slices <= most):
    raise ValueError(f"--num_slices={num_slices} for {name}: a slice count is an integer from 1 "
                     f"to {most} (at most {MAX_SLICES} slices and {MAX_TOTAL_CHIPS} chips in "
                     "all).")


def load(name: str, num_slices: int = 1) -> Topology:
  """The Topology for `name` (`num_slices` such slices joined over DCN), its devices from libtpu
  (no TPU needed; each carries its slice_index when there are several); ValueError if libtpu is
  missing, the name is not a slice or the slice count is out of range."""
  gen, grid = parse(name)
  check_num_slices(name, math.prod(grid), num_slices)
  if not libtpu_available():
    raise ValueError(f"--topology={name}: {INSTALL_HINT}")
  # Compiling needs no TPU, so several planners (or a planner beside a training run) may load
  # libtpu at once instead of waiting on its single-process lock file.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  _describe_this_host_to_libtpu(gen, grid)
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel

  spec = f"{gen}:{'x'.join(map(str, grid))}"
  slices = {"num_slices": num_slices} if num_slices > 1 else {}  # as MaxText's train_compile
  try:
    devices = topologies.get_topology_desc(
        platform="tpu", topology_name=spec, chip_config_name=chip_config(gen),
        chips_per_host_bounds=host_bounds(grid), wrap=wraparound(gen, grid), **slices).devices
  except Exception as err:  # pylint: disable=broad-except  # libtpu's own words
    what = f"{spec} x {num_slices} slices" if slices else spec
    raise _bad(name, f"libtpu rejects {what} ({(str(err).splitlines() or [repr(err)])[0][:200]})"
               ) from err
  return Topology(name, gen, grid, tuple(devices), num_slices)
