"""The results table of a sweep: one small JSON row file per run, in a directory.

Many hosts append to one table at once, in a bucket or on disk, with no lock: each finished run
writes its own object (`<time>-<run>-<hash>.json`), and `load_results` reads them back in order as
a list of dicts, the canonical form the fits and notebooks use (`pandas.DataFrame(rows)` works
too). `load_results` also reads a CSV or Parquet file of (N, D, loss) that a user brings, and the
SQLite files earlier versions wrote (local paths only; `.sqlite`/`.db` tables are still appended).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sqlite3
import time
import uuid
from typing import Any

from pretrainx import storage

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


def _append_sqlite(db_path: str, row: dict[str, Any]) -> None:
  """Appends one run's row to a SQLite table, creating file and table if needed."""
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


def _load_sqlite(db_path: str) -> list[dict[str, Any]]:
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
  out = []
  for values in rows:
    row = dict(zip(COLUMN_NAMES, values))
    for name in JSON_COLUMNS:
      if row[name] is not None:
        row[name] = json.loads(row[name])
    out.append(row)
  return out


# -- the table a sweep writes: a directory of row files ------------------------------------------

SQLITE_SUFFIXES = (".sqlite", ".sqlite3", ".db")
_ROW_NAME = re.compile(r"^\d{20}-.*\.json$")


def table_format(path: str) -> str:
  """'sqlite', 'csv' or 'parquet' by the file's suffix; else 'rows' (a directory of row files)."""
  name = storage.basename(path).lower()
  if name.endswith(SQLITE_SUFFIXES):
    return "sqlite"
  for kind in ("csv", "parquet"):
    if name.endswith(f".{kind}"):
      return kind
  return "rows"


def append_result(path: str, row: dict[str, Any]) -> str:
  """Adds one run's row to the table at `path` (a directory of row files, or a local SQLite
  file); returns where it went."""
  kind = table_format(path)
  values = dict(zip(COLUMN_NAMES, _encode_row(path, row)))
  if kind == "sqlite":
    if storage.is_remote(path):
      raise storage.StorageError(
          f"results table {path}: SQLite cannot live in a bucket; point SweepConfig.results at a "
          f"directory (e.g. {path.rsplit('.', 1)[0]}) and each run writes a row file there.")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _append_sqlite(path, row)
    return path
  if kind != "rows":
    raise ValueError(f"results table {path} is a {kind} file, which pretrainx only reads; point "
                     "SweepConfig.results at a directory for the sweep's own rows.")
  for name in JSON_COLUMNS:
    if values[name] is not None:
      values[name] = json.loads(values[name])
  safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", str(values["run"]))[:80]
  name = f"{time.time_ns():020d}-{safe}-{str(values['config_hash'])[:12]}-{uuid.uuid4().hex[:6]}"
  target = storage.join(storage.resolve(path), f"{name}.json")
  storage.check_bucket(target, "write the results table")
  storage.write_text(target, json.dumps(_json_safe(values), sort_keys=True))
  return target


def _json_safe(values: dict[str, Any]) -> dict[str, Any]:
  """NaN and infinities as null: the row files stay strict JSON."""
  clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v
  return {k: clean(v) for k, v in values.items()}


def _load_rows(path: str) -> list[dict[str, Any]]:
  names = [n for n in storage.listdir(path) if _ROW_NAME.match(n)]
  out = []
  for name in names:  # the time prefix sorts them in the order they were written
    try:
      row = json.loads(storage.read_text(storage.join(path, name)))
    except ValueError as err:
      raise ValueError(f"results row {storage.join(path, name)} is not JSON ({err}); delete it "
                       "(its run is then redone by the sweep).") from err
    row = {c: row.get(c) for c in COLUMN_NAMES}
    if row["train_loss"] is None:
      row["train_loss"] = float("nan")
    out.append(row)
  return out


_LOSS_COLUMNS = ("loss", "eval_loss", "train_loss")


def _load_user_table(path: str, kind: str) -> list[dict[str, Any]]:
  """A CSV or Parquet table of runs: N, D and a loss column (loss, eval_loss or train_loss);
  C (training FLOPs) defaults to 6 N D, status to 'done'."""
  if kind == "csv":
    records = list(csv.DictReader(io.StringIO(storage.read_text(path))))
  else:
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel

    with storage.open_file(path, "rb") as f:
      records = pq.read_table(f).to_pylist()
  if not records:
    return []
  columns = set(records[0])
  loss = next((c for c in _LOSS_COLUMNS if c in columns), None)
  missing = sorted({"N", "D"} - columns) + ([] if loss else ["loss"])
  if missing:
    raise ValueError(f"results table {path} lacks column(s) {missing} (it has {sorted(columns)}); "
                     "give N (non-embedding parameters), D (training tokens) and loss, one row "
                     "per run.")
  out = []
  for i, rec in enumerate(records):
    num = lambda k: None if rec.get(k) in (None, "") else float(rec[k])
    n, d = num("N"), num("D")
    row = {c: None for c in COLUMN_NAMES}
    row.update(run=str(rec.get("run") or f"row{i}"), config_hash=str(rec.get("config_hash") or i),
               N=int(n), D=int(d), C=num("C") if num("C") is not None else 6.0 * n * d,
               train_loss=num("train_loss") if "train_loss" in columns else num(loss),
               eval_loss=num("eval_loss") if "eval_loss" in columns else num(loss),
               ratio=num("ratio"), status=str(rec.get("status") or "done"))
    out.append(row)
  return out


def load_results(path: str, *, allow_empty: bool = False) -> list[dict[str, Any]]:
  """Every row of the table at `path` as a dict (JSON columns decoded), in insertion order.

  Raises FileNotFoundError for a missing table and ValueError for one that is not a results
  table, has the wrong columns, or (unless allow_empty) has no rows.
  """
  kind = table_format(path)
  storage.check_bucket(path, "read the results table")
  found = (storage.isdir(path) if kind == "rows" else storage.isfile(path))
  if not found:
    if kind == "rows" and allow_empty:
      return []
    raise FileNotFoundError(f"results table {path} not found; run a sweep first "
                            "(python -m pretrainx sweep SWEEP.gin) or check the path.")
  if kind == "sqlite":
    if storage.is_remote(path):
      raise storage.StorageError(f"results table {path}: SQLite files are read from local disk "
                                 "only; copy it here, or use the sweep's row directory.")
    rows = _load_sqlite(path)
  elif kind == "rows":
    rows = _load_rows(path)
  else:
    rows = _load_user_table(path, kind)
  if not rows and not allow_empty:
    raise ValueError(f"results table {path} is empty; let the sweep finish some runs first.")
  return rows
