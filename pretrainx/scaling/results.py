"""The results table of a sweep: one SQLite file, one row per finished run.

`append_result` adds a row (the sweep calls it after every run); `load_results` reads them back as
a list of dicts, the canonical form the fits and notebooks use (`pandas.DataFrame(rows)` works too).
"""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any

TABLE = "results"
# (column, SQLite type, required). JSON columns hold a dict/list encoded as JSON text.
RESULT_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("run", "TEXT", True),            # run name
    ("config_hash", "TEXT", True),    # what makes two runs the same experiment
    ("N", "INTEGER", True),           # non-embedding parameters
    ("D", "INTEGER", True),           # training tokens
    ("C", "REAL", True),              # training FLOPs
    ("train_loss", "REAL", True),     # final train loss
    ("eval_loss", "REAL", False),     # final validation loss (all domains)
    ("domain_losses", "TEXT", False),  # JSON {domain: validation loss}
    ("ratio", "REAL", False),         # domain mixture ratio r (continual pretraining sweeps)
    ("bindings", "TEXT", False),      # JSON list of the run's gin bindings
    ("seconds", "REAL", False),       # wall time
    ("status", "TEXT", True),         # 'done' | 'failed' | ...
)
COLUMN_NAMES = tuple(c for c, _, _ in RESULT_COLUMNS)
JSON_COLUMNS = ("domain_losses", "bindings")


def _connect(db_path: str) -> sqlite3.Connection:
  # Hosts of a launched sweep append to one shared file: wait for another writer's lock.
  return sqlite3.connect(db_path, timeout=60)


def _table_columns(conn: sqlite3.Connection) -> list[str] | None:
  rows = conn.execute(f"PRAGMA table_info({TABLE})").fetchall()
  return [r[1] for r in rows] if rows else None


def _check_columns(db_path: str, columns: list[str]) -> None:
  if tuple(columns) != COLUMN_NAMES:
    missing = sorted(set(COLUMN_NAMES) - set(columns))
    extra = sorted(set(columns) - set(COLUMN_NAMES))
    raise ValueError(f"results table {db_path} is malformed: table '{TABLE}' has columns "
                     f"{columns}; missing {missing}, unexpected {extra}. Expected "
                     f"{list(COLUMN_NAMES)}; write it with pretrainx.scaling.results.append_result "
                     "or start a new file.")


def _encode_row(db_path: str, row: dict[str, Any]) -> tuple[Any, ...]:
  unknown = sorted(set(row) - set(COLUMN_NAMES))
  if unknown:
    raise ValueError(f"row for {db_path} has unknown columns {unknown}; the columns are "
                     f"{list(COLUMN_NAMES)}.")
  missing = [c for c, _, req in RESULT_COLUMNS if req and row.get(c) is None]
  if missing:
    raise ValueError(f"row for {db_path} lacks required columns {missing} (got {sorted(row)}).")
  values = []
  for name, kind, _ in RESULT_COLUMNS:
    value = row.get(name)
    if value is not None:  # numpy/jax scalars become plain Python numbers
      if name in JSON_COLUMNS:
        value = json.dumps(value, sort_keys=True, default=float)
      elif kind == "REAL":
        value = float(value)
      elif kind == "INTEGER":
        value = int(value)
    values.append(value)
  return tuple(values)


def append_result(db_path: str, row: dict[str, Any]) -> None:
  """Appends one run's row to the table in `db_path`, creating file and table if needed."""
  values = _encode_row(db_path, row)
  parent = os.path.dirname(os.path.abspath(db_path))
  os.makedirs(parent, exist_ok=True)
  try:
    with _connect(db_path) as conn:
      columns = _table_columns(conn)
      if columns is None:
        spec = ", ".join(f"{c} {t}" for c, t, _ in RESULT_COLUMNS)
        conn.execute(f"CREATE TABLE {TABLE} ({spec})")
      else:
        _check_columns(db_path, columns)
      marks = ", ".join("?" * len(COLUMN_NAMES))
      conn.execute(f"INSERT INTO {TABLE} ({', '.join(COLUMN_NAMES)}) VALUES ({marks})", values)
  except sqlite3.DatabaseError as err:
    raise ValueError(f"cannot write results table {db_path}: {err}. Is it a SQLite file written "
                     "by pretrainx? Point to another path or remove it.") from err


def load_results(db_path: str, *, allow_empty: bool = False) -> list[dict[str, Any]]:
  """Every row of the table in `db_path` as a dict (JSON columns decoded), in insertion order.

  Raises FileNotFoundError for a missing file and ValueError for a file that is not a results
  table, has the wrong columns, or (unless allow_empty) has no rows.
  """
  if not os.path.exists(db_path):
    raise FileNotFoundError(f"results table {db_path} not found; run a sweep first "
                            "(python -m pretrainx sweep SWEEP.gin) or check the path.")
  try:
    conn = sqlite3.connect(f"file:{os.path.abspath(db_path)}?mode=ro", uri=True)
    try:
      columns = _table_columns(conn)
      if columns is None:
        raise ValueError(f"results table {db_path} has no table '{TABLE}'; it was not written by "
                         "pretrainx.scaling.results.append_result.")
      _check_columns(db_path, columns)
      query = f"SELECT {', '.join(COLUMN_NAMES)} FROM {TABLE} ORDER BY rowid"
      rows = conn.execute(query).fetchall()
    finally:
      conn.close()
  except sqlite3.DatabaseError as err:
    raise ValueError(f"results table {db_path} is not a readable SQLite file ({err}); "
                     "point to the results file a sweep wrote.") from err
  if not rows and not allow_empty:
    raise ValueError(f"results table {db_path} is empty; let the sweep finish some runs first.")
  out = []
  for values in rows:
    row = dict(zip(COLUMN_NAMES, values))
    for name in JSON_COLUMNS:
      if row[name] is not None:
        row[name] = json.loads(row[name])
    out.append(row)
  return out
