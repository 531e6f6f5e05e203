"""Named, numbered versions of what is kept beside a token store's own arrays: score sets
(`STORE/score_sets/NAME/vN/`) and teacher caches (`STORE/teacher_caches/NAME/vN/`). The names
they may take, where version N lives, and which versions exist; what a version holds is each
kind's own (data/score_sets.py, data/teacher_cache.py).
"""

from __future__ import annotations

import json
import re
from typing import Any

from pretrainx import storage

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a side array's name


def version_path(store_path: str, kind: str, name: str, version: int) -> str:
  """STORE/KIND/NAME/vVERSION."""
  return storage.join(store_path, kind, name, f"v{int(version)}")


def versions(store_path: str, kind: str, name: str) -> list[int]:
  """The versions of `name` written so far (complete or not), oldest first."""
  where = storage.join(store_path, kind, name)
  if not storage.isdir(where):
    return []
  return sorted(int(v[1:]) for v in (s.rstrip("/") for s in storage.listdir(where))
                if re.fullmatch(r"v\d+", v))


def as_json(value: Any) -> Any:
  """`value` as read back from JSON (tuples become lists, keys sorted), to compare with what a
  version's info.json holds."""
  return json.loads(json.dumps(value, sort_keys=True))
