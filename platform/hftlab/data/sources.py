"""Loaders for the real data: an HF dataset `name[@config][:split]` or a local .json / .jsonl file.

BeaverTails rows carry prompt, response, category (14 booleans) and is_safe; the task loaders
turn each dataset's native fields into TaskExample with the instruction wording of the papers.
Every problem is reported as a ConfigError naming the config field and the source, before any
training starts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from hftlab.config.loader import ConfigError
from hftlab.data.records import AlignmentPair, HarmfulPair, TaskExample

AGNEWS_LABELS = ["World", "Sports", "Business", "Sci/Tech"]
SST2_LABELS = ["negative", "positive"]

# task -> (default train source, default test source), the names and splits the papers used
TASK_DEFAULTS = {
    "sst2": ("stanfordnlp/sst2:train", "stanfordnlp/sst2:validation"),
    "agnews": ("fancyzhx/ag_news:train", "fancyzhx/ag_news:test"),
    "gsm8k": ("openai/gsm8k@main:train", "openai/gsm8k@main:test"),
    "alpaca": ("tatsu-lab/alpaca:train", "tatsu-lab/alpaca_eval@alpaca_eval:eval"),
}


def _same(a: str, b: str) -> bool:
    return Path(a).resolve() == Path(b).resolve() if is_local(a) and is_local(b) else a == b


def is_local(source: str) -> bool:
    return source.endswith((".json", ".jsonl")) or Path(source).exists()


def read_rows(source: str, field: str) -> list[dict]:
    """All rows of a source, as dicts."""
    if is_local(source):
        return _read_local(Path(source), field)
    name, _, split = source.partition(":")
    name, _, config = name.partition("@")
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # offline, unknown name, unknown split: say which field and source
        raise ConfigError(field, source, f"could not load the HF dataset ({type(exc).__name__}: {exc})") from None
    return [dict(row) for row in ds]


MAX_LINE_BYTES = 2**21  # 2 MiB: no row of any dataset here comes near; a longer line is a broken or hostile file


def _read_local(path: Path, field: str) -> list[dict]:
    """A .jsonl (one object a line) or .json (a list of objects) file's rows; any fault is a ConfigError naming
    `field`, the file and the line or row: not UTF-8, not JSON, a cut last line, a line over MAX_LINE_BYTES, a row
    that is not an object."""
    if not path.is_file():
        raise ConfigError(field, str(path), "no such file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(field, str(path), f"line {line} is not UTF-8 text (byte {exc.start})") from None
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if len(line) > MAX_LINE_BYTES:
                raise ConfigError(field, str(path), f"line {n} is {len(line) / 2**20:.1f} MB, over the "
                                  f"{MAX_LINE_BYTES / 2**20:.0f} MB a row may take")
            if line.strip():
                try:
                    row = json.loads(line)
                except (json.JSONDecodeError, RecursionError) as exc:
                    why = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deep"
                    raise ConfigError(field, str(path), f"line {n} is not JSON ({why})") from None
                if not isinstance(row, dict):
                    raise ConfigError(field, str(path), f"line {n} is not a JSON object but {type(row).__name__}")
                rows.append(row)
        return rows
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(field, str(path), f"not JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise ConfigError(field, str(path), "not JSON (nested too deep)") from None
    if not isinstance(data, list):
        raise ConfigError(field, str(path), "a .json source must hold a list of rows")
    for n, row in enumerate(data, start=1):
        if not isinstance(row, dict):
            raise ConfigError(field, str(path), f"row {n} is not a JSON object but {type(row).__name__}")
    return data


def _require(row: dict, keys: tuple[str, ...], field: str, source: str, n: int) -> None:
    for key in keys:
        if not isinstance(row, dict) or key not in row or row[key] is None:
            raise ConfigError(field, source, f"row {n} is missing field {key!r}")


def category_of(row: dict) -> str:
    """BeaverTails' category flags as one comma-joined string of the true ones (or the field as given)."""
    cat = row.get("category", "")
    if isinstance(cat, dict):
        return ",".join(sorted(k for k, v in cat.items() if v))
    return str(cat)


def load_pairs(source: str, field: str, *, safe: bool) -> list[AlignmentPair] | list[HarmfulPair]:
    """BeaverTails-format rows -> AlignmentPair (safe=True) or HarmfulPair (safe=False).

    Rows with an `is_safe` key are filtered to the wanted kind; rows without one are taken as given.
    """
    cls = AlignmentPair if safe else HarmfulPair
    out = []
    for n, row in enumerate(read_rows(source, field), start=1):
        _require(row, ("prompt", "response"), field, source, n)
        if "is_safe" in row and bool(row["is_safe"]) != safe:
            continue
        out.append(cls(f"{Path(source).stem}-{n}", str(row["prompt"]), str(row["response"]), category_of(row)))
    if not out:
        raise ConfigError(field, source, f"has no {'safe' if safe else 'unsafe'} rows")
    return out


def _label(row: dict, k: int, field: str, source: str, n: int) -> int:
    """A class label in 0..k-1 (an int, or a float or string holding one); else a ConfigError naming the row."""
    value = row["label"]
    try:
        label = int(value) if not isinstance(value, bool) and float(value) == int(float(value)) else -1
    except (TypeError, ValueError, OverflowError):
        label = -1
    if not 0 <= label < k:
        raise ConfigError(field, source, f"row {n} has label {value!r}, not one of 0..{k - 1}")
    return label


def task_example(task: str, row: dict, rid: str, field: str, source: str, n: int) -> TaskExample:
    """One dataset row -> TaskExample, accepting the dataset's own fields or plain prompt/answer."""
    if "prompt" in row and "answer" in row:
        return TaskExample(rid, task, str(row["prompt"]), str(row["answer"]))
    if task == "sst2":
        _require(row, ("sentence", "label"), field, source, n)
        prompt = f"Analyze the sentiment of the input, and respond only positive or negative.\nInput: {row['sentence']}"
        return TaskExample(rid, task, prompt, SST2_LABELS[_label(row, len(SST2_LABELS), field, source, n)])
    if task == "agnews":
        _require(row, ("text", "label"), field, source, n)
        prompt = ("Categorize the news article into one of the 4 categories: World, Sports, Business, Sci/Tech.\n"
                  f"Input: {row['text']}")
        return TaskExample(rid, task, prompt, AGNEWS_LABELS[_label(row, len(AGNEWS_LABELS), field, source, n)])
    if task == "gsm8k":
        _require(row, ("question", "answer"), field, source, n)
        return TaskExample(rid, task, str(row["question"]), str(row["answer"]))
    _require(row, ("instruction", "output"), field, source, n)
    extra = row.get("input") or ""
    prompt = f"{row['instruction']}\nInput: {extra}" if extra else str(row["instruction"])
    return TaskExample(rid, task, prompt, str(row["output"]), metric="rouge_l")  # open-ended: no exact answer


def load_task(task: str, source: str | None, field: str, *, test: bool, holdout: tuple[str | None, float, int] | None = None
              ) -> list[TaskExample]:
    """A task's train or test examples; `source=None` takes the task's default HF dataset.

    `holdout=(other_source, share, seed)`: when `other_source` names the same data as `source` (one file for train and
    test), its rows are shuffled by `seed` and cut: the first `share` of them are the test set, the rest train.
    """
    source = source or TASK_DEFAULTS[task][1 if test else 0]
    rows = read_rows(source, field)
    if holdout is not None and holdout[0] is not None and _same(source, holdout[0]):
        order = list(range(len(rows)))
        random.Random(holdout[2]).shuffle(order)
        n_test = round(len(rows) * holdout[1])
        keep = sorted(order[:n_test] if test else order[n_test:])
        rows = [rows[i] for i in keep]
    out = []
    for n, row in enumerate(rows, start=1):
        if task == "sst2" and isinstance(row, dict) and row.get("label") == -1:
            continue  # SST2's hidden-label test rows
        out.append(task_example(task, row, f"{task}-{'test' if test else 'train'}-{n}", field, source, n))
    if not out:
        raise ConfigError(field, source, "has no rows")
    return out
