"""Which JAX backends a host can start, decided before JAX is imported.

The `tpu` extra installs libtpu everywhere, and JAX then tries the TPU backend on every host: on a
machine without TPU chips libtpu prints a page of errors before falling back to the CPU. Here, when
JAX_PLATFORMS is unset, libtpu is installed and no TPU chip is attached, JAX_PLATFORMS is set to
the backends this host can run (a GPU plugin's platform where one is installed, then `cpu`).
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import os
import pkgutil
import sys
from typing import Mapping, MutableMapping

# jax/_src/hardware_utils.py: TPU chips are PCI devices of Google's vendor id with these ids.
_GOOGLE_PCI_VENDOR_ID = "0x1ae0"
_TPU_PCI_DEVICE_IDS = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")


def tpu_chips_attached(root: str = "/") -> int:
  """TPU chips this machine has: Google TPU PCI devices under `root`/sys (as JAX counts them),
  else /dev/accel* (v4, v5p) or /dev/vfio/N (v5e, v6e) device nodes."""
  chips = 0
  for vendor in glob.glob(os.path.join(root, "sys/bus/pci/devices/*/vendor")):
    try:
      with open(vendor, encoding="ascii") as f:
        if f.read().strip() != _GOOGLE_PCI_VENDOR_ID:
          continue
      with open(os.path.join(os.path.dirname(vendor), "device"), encoding="ascii") as f:
        chips += f.read().strip() in _TPU_PCI_DEVICE_IDS
    except OSError:
      continue
  if chips:
    return chips
  nodes = glob.glob(os.path.join(root, "dev/accel[0-9]*"))
  nodes += [p for p in glob.glob(os.path.join(root, "dev/vfio/*")) if os.path.basename(p).isdigit()]
  return len(nodes)
# The platform each known PJRT plugin package registers (jax_plugins.<name> or an entry point).
_PLUGIN_PLATFORMS = (("cuda", "cuda"), ("rocm", "rocm"))


def installed_plugins() -> list[str]:
  """Names of the JAX PJRT plugins installed (modules of the `jax_plugins` namespace package and
  `jax_plugins` entry points), without importing any of them."""
  names = set()
  if importlib.util.find_spec("jax_plugins") is not None:
    import jax_plugins  # pylint: disable=import-outside-toplevel,import-error

    names.update(m.name for m in pkgutil.iter_modules(jax_plugins.__path__))
  names.update(ep.name for ep in importlib.metadata.entry_points(group="jax_plugins"))
  return sorted(names)


def platforms_without_tpu(plugins: list[str]) -> str | None:
  """The JAX_PLATFORMS value that starts every installed backend but the TPU, or None when a
  plugin's platform is unknown (then JAX is left to choose)."""
  found = []
  for plugin in plugins:
    platform = next((p for key, p in _PLUGIN_PLATFORMS if key in plugin.lower()), None)
    if platform is None:
      return None
    if platform not in found:
      found.append(platform)
  return ",".join(found + ["cpu"])


def choose_platforms(environ: MutableMapping[str, str] = os.environ, root: str = "/",
                     plugins: list[str] | None = None) -> str | None:
  """Sets JAX_PLATFORMS in `environ` so that JAX never starts libtpu on a host without TPU chips;
  returns the value set, or None when nothing was changed.

  Leaves alone: a JAX_PLATFORMS already given (even empty), JAX_FORCE_TPU_INIT, hosts without
  libtpu, and hosts with TPU chips attached."""
  if "JAX_PLATFORMS" in environ or "JAX_FORCE_TPU_INIT" in environ:
    return None
  if not _libtpu_installed(environ) or tpu_chips_attached(root) > 0:
    return None
  value = platforms_without_tpu(installed_plugins() if plugins is None else plugins)
  if value is not None:
    environ["JAX_PLATFORMS"] = value
    _update_imported_jax(value)
  return value


def _update_imported_jax(value: str) -> None:
  """JAX imported before pretrainx read JAX_PLATFORMS already: set its flag, unless its backends
  have started (then it is too late, and harmless to leave)."""
  if "jax" not in sys.modules:
    return
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel

  if not xla_bridge.backends_are_initialized():
    sys.modules["jax"].config.update("jax_platforms", value)


def _libtpu_installed(environ: Mapping[str, str]) -> bool:
  path = environ.get("TPU_LIBRARY_PATH")
  return bool(path and os.path.isfile(path)) or importlib.util.find_spec("libtpu") is not None
