"""Where models, tokenizers and datasets come from, and how data files are read.

`local_or_hub`: a local path as it is, anything else from the Hugging Face Hub (huggingface_hub's cache;
HF_HUB_OFFLINE=1 never touches the network). A name that looks like a path (a leading ".", "/", "~" or "runs/", two
"/", a first folder that exists here, or a file suffix) and does not exist is a one-line error at once, naming the
command that makes it where the README's pipeline does (runs/sft, runs/reward); so is a Hub failure.
`load_rows`: a .jsonl/.json/.parquet file, a local folder of split-named files, or a Hub dataset id, as plain dicts
that remember where each was read (`Rows`); a malformed file is a one-line error naming its line. A data file is the
train split alone: an evaluation split is never its rows again (`MissingSplit`).
"""

import json
import re
from pathlib import Path

# The folders the README's pipeline makes (configs/ppo.toml reads both), by the command that makes each
MADE_BY = {"runs/sft": "python -m minirlhf.sft configs/sft.toml",
           "runs/reward": "python -m minirlhf.reward configs/reward.toml"}


def local_or_hub(name: str, patterns: list[str], revision: str | None = None, repo_type: str = "model") -> Path:
    """The local file or folder `name`, or the folder of a Hub snapshot; ValueError (one line) if neither."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    name = str(name)
    looks_local = Path(name).suffix in (".json", ".jsonl", ".parquet", ".toml", ".safetensors")
    in_a_folder_here = "/" in name and Path(name.partition("/")[0]).is_dir()  # else the first part is a Hub owner
    if looks_local or name.startswith((".", "/", "~", "runs/")) or name.count("/") > 1 or in_a_folder_here:
        made_by = MADE_BY.get(Path(name).as_posix())
        raise ValueError(f"{name}: no such file or folder" + (f"; `{made_by}` makes it" if made_by else ""))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(name, repo_type=repo_type, revision=revision, allow_patterns=patterns))
    except (HFValidationError, OSError) as e:  # offline, unknown repo, bad id: huggingface_hub's errors are OSErrors
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{name}: no such local file or folder, and not found on the Hugging Face Hub "
                         f"({type(e).__name__}: {reason})") from None


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
# How `datasets` names the split of each file in a folder (datasets/data_files.py, ALL_DEFAULT_PATTERNS): if some
# file is "data/{split}-00000-of-00003.*", those files, for any split name; else a split keyword standing alone
# (between "-._ 0-9" or "/") in folder names, e.g. dev/rows.jsonl; else in file names, e.g. train.jsonl or
# data/test-0.json; else every file is "train". The first rule that matches some file is the only one used.
SHARDED = re.compile(r"^data/(.+)-\d{5}-of-\d{5}[^/]*$")
SPLIT_KEYWORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
                  "test": ("test", "testing", "eval", "evaluation")}


class Rows(list):
    """load_rows' rows (plain dicts) and, for messages, where each was read: `where[i]` is "line 7" of a JSON-lines
    file (counted from 1 as editors do, blank lines included) or "row 7" of a JSON list or parquet file (from 1), after
    the file's path within a folder ("train.jsonl line 7")."""

    def __init__(self, numbered: list[tuple[str, dict]]):
        super().__init__(row for _, row in numbered)
        self.where = [where for where, _ in numbered]


class MissingSplit(ValueError):
    """The dataset has no such split (a one-line error, unless the caller has something else to use)."""


def load_rows(dataset_name: str, split: str, revision: str | None = None, evaluation: bool = False) -> Rows:
    """Rows of a data file, of the `split` files in a folder, or of a Hub dataset (downloaded to the huggingface_hub
    cache, then read like a folder). A data file is the train split, whatever its name: for an `evaluation` split it
    is MissingSplit, not the training rows again (which `datasets` would not give either: a file is split "train")."""
    path = local_or_hub(dataset_name, [f"*{suffix}" for suffix in DATA_SUFFIXES], revision, repo_type="dataset")
    if path.is_file() and evaluation:
        raise MissingSplit(f"{dataset_name}: a data file is the train split alone: no {split!r} split to evaluate on "
                           f"(its rows are the training rows); make dataset_name a folder holding train.jsonl and "
                           f'{split}.jsonl, or train without evaluating: eval_strategy = "no"')
    if path.is_file():
        return Rows(_read_file(path))
    advice = f'add a {split}.jsonl, or train without evaluating: eval_strategy = "no"' if evaluation else ""
    files = _split_files(path, split, advice)
    return Rows([(f"{file.relative_to(path)} {where}", row) for file in files for where, row in _read_file(file)])


def _split_files(folder: Path, split: str, advice: str = "") -> list[Path]:
    relative = (p.relative_to(folder) for p in folder.rglob("*") if p.suffix in DATA_SUFFIXES)
    files = sorted(p.as_posix() for p in relative if not any(part.startswith(".") for part in p.parts))  # no .cache
    split_of = {file: match.group(1) for file in files if (match := SHARDED.match(file))}
    for part in (lambda file: file.rpartition("/")[0], lambda file: file.rpartition("/")[2]):  # folders, then names
        split_of = split_of or {file: name for file in files for name, keywords in SPLIT_KEYWORDS.items()
                                if any(re.search(rf"(^|[-._ 0-9/]){k}([-._ 0-9/]|$)", part(file)) for k in keywords)}
    split_of = split_of or dict.fromkeys(files, "train")
    chosen = [folder / file for file, name in split_of.items() if name == split]
    if not chosen:
        available = sorted(set(split_of.values()))
        raise MissingSplit(f"{folder}: no data files for split {split!r}; available splits: {available}"
                           + (f"; {advice}" if advice else ""))
    return chosen


def _read_file(path: Path) -> list[tuple[str, dict]]:
    """(where, row) pairs: "line n" of a JSON-lines file, "row n" of a JSON list or parquet file, from 1."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet
        except ImportError as error:
            raise ImportError(f"{path}: reading parquet needs pyarrow: pip install 'minirlhf[parquet]'") from error
        return [(f"row {i}", row) for i, row in enumerate(pyarrow.parquet.read_table(path).to_pylist(), 1)]
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ValueError(f"{path}: line {line}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    if path.suffix == ".json" and text.lstrip().startswith("["):  # one JSON list of rows; else JSON lines
        numbered = [(f"row {i}", row) for i, row in enumerate(_parse_json(text, path, line_number=1), 1)]
    else:
        numbered = [(f"line {n}", _parse_json(line, path, n)) for n, line in enumerate(text.splitlines(), 1)
                    if line.strip()]
    for where, row in numbered:
        if not isinstance(row, dict):
            raise ValueError(f"{path}: {where}: expected a JSON object, got {type(row).__name__}")
    return numbered


def _parse_json(text: str, path: Path, line_number: int):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: line {line_number + error.lineno - 1}: invalid JSON: {error.msg}") from None
