"""Schema inference for the ``--data`` quick start: column types a user can trust.

Rules, column by column (``drop`` and ``keep`` override them for the columns they name):

- every cell a number -> numeric (unless it looks like an integer identifier: dropped); blank, NaN and inf cells
  are missing there, as in the data stage (they follow data.missing_values), never a reason to retype; with
  proposed bounds: the pooled 1st and 99th percentiles rounded outward to 2 significant digits;
- numbers except a few cells (at most 10 % of the cells, and at most ``_TYPO_MAX_CELLS`` distinct values or 1 %
  of the cells) -> an
  error naming those cells and their lines: ``12,5O0`` in a balance column is a typo, not a category;
- text with very many distinct values (more than ``_MAX_CATEGORIES``, or more than half the rows) -> dropped
  with a warning (identifiers, names, free text): never one-hot encoded;
- other text -> categorical. With an institution column, the vocabulary keeps only values seen at 2 or more
  institutions; the rest share the bucket ``OTHER`` (shared/table_checks.py maps undeclared values to it). A
  value that only one institution has (a customer's surname, a branch code) would otherwise be written into
  every institution's schema, model and files;
- a feature that by itself nearly determines the label (single-column AUC >= ``LEAKY_AUC``, with each category
  scored by its churn rate) is an error unless dropped or allowed with ``allow_leaky``: a model trained on it
  reports near-perfect AUC and learns nothing that holds at prediction time.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from fedchurn.shared.config import SchemaConfig
from fedchurn.shared.errors import DataError
from fedchurn.shared.table_checks import (
    OTHER,
    _blank,
    _is_number_text,
    _is_positive_default,
    institution_codes,
    parse_numeric,
)
from fedchurn.shared.table_io import ColumnTable, check_column, read_columns, read_header

logger = logging.getLogger("fedchurn.shared.data")  # one logger for the data pipeline (users filter on it)

LEAKY_AUC = 0.95
MIN_INSTITUTIONS_PER_VALUE = 2
_MAX_CATEGORIES = 100
_TEXT_ID_MIN_DISTINCT = 20
_TYPO_MAX_CELLS = 5
_AUC_SAMPLE = 200_000
_ID_NAME = re.compile(r"(^id|id$|num$|number$|no$|key$|code$)", re.IGNORECASE)
_INT_TEXT = re.compile(r"^[+-]?\d+$")


@dataclass(frozen=True)
class InferredSchema:
    schema: SchemaConfig
    report: tuple[str, ...]  # one human line per column
    warnings: tuple[str, ...] = ()  # columns dropped because they look like identifiers or free text


def _looks_like_integer_id(column: str, values: np.ndarray, texts: pa.Array) -> bool:
    """All-unique integers that are also named like an id, count rows, or share a long fixed width."""
    if len(values) < 20 or not np.all(values == np.round(values)) or len(np.unique(values)) != len(values):
        return False
    if not bool(pc.all(pc.match_substring_regex(texts, _INT_TEXT.pattern)).as_py()):
        return False
    if _ID_NAME.search(column.replace("_", "").replace(" ", "")):
        return True
    if values.max() - values.min() + 1 == len(values):  # a row counter
        return True
    widths = pc.unique(pc.utf8_length(pc.utf8_ltrim(texts, characters="+-"))).to_pylist()
    return len(widths) == 1 and widths[0] >= 6  # fixed-width account / client numbers


def _round_outward(value: float, *, up: bool) -> float:
    """``value`` rounded away from the data to 2 significant digits (a coarse, public-looking bound)."""
    if value == 0.0 or not math.isfinite(value):
        return 0.0 if not math.isfinite(value) else value
    exponent = math.floor(math.log10(abs(value))) - 1
    step = 10.0**exponent
    scaled = value / step
    rounded = (math.ceil(scaled - 1e-9) if up else math.floor(scaled + 1e-9)) * step
    return float(f"{rounded:.2g}") if abs(rounded) >= 1 else round(rounded, -exponent)


def propose_bounds(values: np.ndarray) -> tuple[float, float]:
    """Pooled 1st and 99th percentiles, rounded outward to 2 significant digits; never an empty range."""
    present = values[~np.isnan(values)]
    low, high = (float(v) for v in np.percentile(present, [1, 99]))
    low, high = _round_outward(low, up=False), _round_outward(high, up=True)
    if high <= low:
        high = low + max(abs(low) * 0.01, 1.0)
    return low, high


def single_column_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """max(AUC, 1 - AUC) of ``scores`` for ``labels`` (Mann-Whitney, ties counted half)."""
    ok = ~np.isnan(scores)
    labels, scores = labels[ok], scores[ok]
    n1 = int(labels.sum())
    n0 = len(labels) - n1
    if n1 == 0 or n0 == 0:
        return 0.5
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    auc = (ranks[labels == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0)
    return float(max(auc, 1.0 - auc))


def _category_scores(text: pa.Array, labels: np.ndarray, blank: np.ndarray) -> np.ndarray:
    """Each row scored by its category's churn rate (NaN where blank)."""
    encoded = pc.dictionary_encode(text)
    codes = np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
    k = len(encoded.dictionary)
    totals = np.bincount(codes, minlength=k)
    positives = np.bincount(codes, weights=labels, minlength=k)
    rate = positives / np.maximum(totals, 1)
    scores = rate[codes]
    scores[blank] = np.nan
    return scores


def infer_schema(
    path: str | Path,
    *,
    label: str,
    positive: str | None = None,
    institution_column: str | None = None,
    drop: Sequence[str] = (),
    keep: Sequence[str] = (),
    allow_leaky: Sequence[str] = (),
) -> InferredSchema:
    """Guess a schema from a CSV or Parquet table (rules in the module docstring)."""
    header = read_header(path)
    name = str(path)
    check_column(name, header, label, "label")
    if institution_column:
        check_column(name, header, institution_column, "institution")
    if institution_column == label:
        raise DataError("the label column cannot also be the institution column", path=name, column=label)
    for column in [*drop, *keep, *allow_leaky]:
        role = "--drop" if column in drop else "--keep" if column in keep else "--allow-leaky"
        check_column(name, header, column, role)
    seen: set[str] = set()
    for column in header:
        if column in seen:
            raise DataError(f"the header names column {column!r} twice", path=name, line=1, column=column)
        seen.add(column)
    features = [c for c in header if c not in (label, institution_column)]
    # Remembered: the data stage of the same run takes its columns from here instead of reading the file again.
    table = read_columns(path, [label, *([institution_column] if institution_column else []), *features], remember=True)
    report: list[str] = []
    warnings: list[str] = []

    labels, positive = _infer_label(table, label, positive)
    report.append(f"{label}: label (positive {positive!r}: {int(labels.sum())} of {table.n_rows} rows)")
    inst_codes: np.ndarray | None = None
    if institution_column:
        values, inst_codes = institution_codes(table, institution_column)
        report.append(f"{institution_column}: institution column ({len(values)} institutions)")

    # Leakage is judged on at most _AUC_SAMPLE rows (a seeded sample): the AUC's error is then ~0.002.
    sample = np.arange(table.n_rows)
    if table.n_rows > _AUC_SAMPLE:
        sample = np.sort(np.random.default_rng(0).choice(table.n_rows, _AUC_SAMPLE, replace=False))
    numeric: list[str] = []
    categorical: dict[str, tuple[str, ...]] = {}
    bounds: dict[str, tuple[float, float]] = {}
    dropped: list[str] = []
    leaky: list[str] = []
    for column in features:
        if column in drop:
            dropped.append(column)
            report.append(f"{column}: dropped (as asked)")
            continue
        # A blank cell and one holding NaN or inf are both missing (shared/table_checks.parse_numeric): they never
        # retype a numeric column. In a column that is not all numbers they stay what they are (text).
        text = table.text(column)
        numbers, missing, first_bad = parse_numeric(table, column)
        bad: list[str] = []
        if first_bad is None:
            blank = missing
        else:
            blank = _blank(text)
            distinct_text: list[str] = pc.unique(pc.filter(text, pa.array(~blank))).to_pylist()
            bad = [v for v in distinct_text if not _is_number_text(v)]
        present = int((~blank).sum())
        blanks = len(blank) - present
        non_finite = int((blank & ~_blank(text)).sum())
        blank_note = f", {blanks} blank cell(s)" if blanks else ""
        if non_finite:
            blank_note += f" ({non_finite} of them NaN or inf)"
        if present == 0:
            dropped.append(column)
            report.append(f"{column}: dropped (every cell is blank, NaN or inf)")
            continue
        present_text = pc.filter(text, pa.array(~blank))
        if not bad:
            col_numbers = numbers[~blank]
            if column not in keep and _looks_like_integer_id(column, col_numbers, present_text):
                dropped.append(column)
                report.append(f"{column}: dropped (looks like an identifier: {present} unique integers)")
                continue
            numeric.append(column)
            bounds[column] = propose_bounds(numbers)
            low, high = bounds[column]
            blank_part = f" ({blank_note[2:]})" if blanks else ""
            report.append(f"{column}: numeric{blank_part}, bounds [{low:g}, {high:g}]")
            if column not in allow_leaky and single_column_auc(labels[sample], numbers[sample]) >= LEAKY_AUC:
                leaky.append(column)
            continue
        bad_cells = int(_mask_in(text, bad).sum())
        distinct: list[str] = pc.unique(present_text).to_pylist()
        if bad_cells <= 0.1 * present and (len(bad) <= _TYPO_MAX_CELLS or bad_cells <= 0.01 * present):
            raise _typo_error(table, column, text, bad, bad_cells)
        if column not in keep and (
            len(distinct) > _MAX_CATEGORIES or (len(distinct) > _TEXT_ID_MIN_DISTINCT and len(distinct) > 0.5 * present)
        ):
            dropped.append(column)
            note = (
                f"{column}: dropped (looks like an identifier or free text: {len(distinct)} distinct text values "
                f"in {present} rows)"
            )
            report.append(note)
            warnings.append(note)
            continue
        vocabulary, rare = _shared_vocabulary(text, blank, inst_codes, distinct)
        categorical[column] = (*vocabulary, *((OTHER,) if rare else ()))
        shared_note = f", {rare} value(s) seen at one institution only -> {OTHER!r}" if rare else ""
        report.append(f"{column}: categorical ({len(vocabulary)} values{shared_note}{blank_note})")
        scores = _category_scores(text, labels, blank)
        if column not in allow_leaky and single_column_auc(labels[sample], scores[sample]) >= LEAKY_AUC:
            leaky.append(column)
    if leaky:
        raise DataError(
            f"column(s) {', '.join(repr(c) for c in leaky)} by themselves nearly determine the label "
            f"(single-column AUC >= {LEAKY_AUC}): a model trained on them scores near-perfectly here and learns "
            "nothing that holds when the label is unknown",
            path=name,
            column=leaky[0],
            fix=f"drop them (--drop {','.join(leaky)}), or keep them knowingly with --allow-leaky {','.join(leaky)}",
        )
    if not numeric and not categorical:
        raise DataError(
            "no feature columns left after dropping the label, institution and identifier columns", path=name
        )
    schema = SchemaConfig(
        label=label,
        positive=positive,
        numeric=tuple(numeric),
        categorical=categorical,
        drop=tuple(dropped),
        bounds=bounds,
    )
    for entry in warnings:
        logger.warning("%s: %s", name, entry)
    return InferredSchema(schema=schema, report=tuple(report), warnings=tuple(warnings))


def _mask_in(text: pa.Array, values: list[str]) -> np.ndarray:
    hits = pc.is_in(text, value_set=pa.array(values, pa.string()))
    return np.asarray(pc.fill_null(hits, False).to_numpy(zero_copy_only=False), dtype=bool)


def _typo_error(table: ColumnTable, column: str, text: pa.Array, bad: list[str], bad_cells: int) -> DataError:
    rows = np.flatnonzero(_mask_in(text, bad))[:5]
    shown = ", ".join(f"{text[int(r)].as_py()!r} on line {int(table.line_numbers[r])}" for r in rows)
    more = f" and {bad_cells - len(rows)} more" if bad_cells > len(rows) else ""
    return DataError(
        f"column is numeric except {bad_cells} cell(s): {shown}{more}",
        path=table.path,
        line=int(table.line_numbers[rows[0]]),
        column=column,
        fix="correct those cells (or leave them blank); if the column really is text, drop it with --drop "
        f"{column} or declare it under data.schema.categorical",
    )


def _shared_vocabulary(
    text: pa.Array, blank: np.ndarray, inst_codes: np.ndarray | None, distinct: list[str]
) -> tuple[tuple[str, ...], int]:
    """(sorted values seen at >= MIN_INSTITUTIONS_PER_VALUE institutions, how many others), all with one file."""
    if inst_codes is None:
        return tuple(sorted(distinct)), 0
    encoded = pc.dictionary_encode(text)
    values: list[str] = encoded.dictionary.to_pylist()
    codes = np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int64)
    pairs = np.unique(np.stack([codes[~blank], inst_codes[~blank]]), axis=1)
    per_value = np.bincount(pairs[0], minlength=len(values))
    shared = sorted(
        v for v, count in zip(values, per_value.tolist(), strict=True) if count >= MIN_INSTITUTIONS_PER_VALUE and v
    )
    return tuple(shared), len([v for v in distinct if v not in set(shared)])


def _infer_label(table: ColumnTable, label: str, positive: str | None) -> tuple[np.ndarray, str]:
    text = table.text(label)
    blank = np.flatnonzero(_blank(text))
    if len(blank):
        raise DataError(
            "blank label: every row needs its churn label",
            path=table.path,
            line=int(table.line_numbers[blank[0]]),
            column=label,
        )
    in_order: list[str] = pc.unique(text).to_pylist()
    values = sorted(in_order)
    shown = ", ".join(repr(v) for v in values[:10])
    if len(values) != 2:
        line = None
        if len(values) > 2:
            line = int(table.line_numbers[int(pc.index(text, values[2]).as_py())])
        raise DataError(
            f"label must have exactly 2 distinct values, found {len(values)}: {shown}",
            path=table.path,
            line=line,
            column=label,
        )
    if positive is not None:
        if positive not in values:
            raise DataError(
                f"positive value {positive!r} is not a value of the label; its values are {shown}",
                path=table.path,
                column=label,
                fix="pass --positive with one of them",
            )
    else:
        recognised = [v for v in values if _is_positive_default(v)]
        if len(recognised) != 1:
            raise DataError(
                f"cannot tell which label value means churn: the values are {shown}",
                path=table.path,
                column=label,
                fix="pass --positive VALUE with the value that means churn",
            )
        positive = recognised[0]
    labels = np.asarray(pc.equal(text, positive).to_numpy(zero_copy_only=False), dtype=np.int64)
    return labels, positive
