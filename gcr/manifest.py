"""Score manifests: the images `gcr score` judges, read and validated whole before any model loads.

Three formats, chosen by the file's extension, each a list of entries with the same keys:

    image    the image to score (required); relative paths start at the manifest's folder
    prompt   what it should show, or for an edit the instruction (required)
    source   for an edit: the image that was edited (optional; its presence makes the entry an edit)
    id       a name for the entry (optional; letters, digits, '-', '_', '.'; unique)

- YAML (.yaml, .yml): a list of mappings (`- image: a.png` / `  prompt: a red fox`), read with the
  same bounded safe loader as batch files (gcr.batchfile: depth and alias limits, no Python tags).
- JSON Lines (.jsonl, .ndjson): one JSON object per line; blank lines are skipped.
- CSV (.csv): a header row naming the columns (image and prompt at least); other columns are
  ignored, so a CSV written by `gcr score --csv` can be scored again.

`load_manifest` returns the entries or raises ONE ManifestError listing every problem with its line
number (like batch files), and every image goes through gcr.images' one check and pixel limit. Images
given on the command line become the same entries (`entries_from_args`), so both paths share one
validation. Nothing heavy is imported here.
"""
from __future__ import annotations

import csv
import difflib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from gcr.batchfile import _ID, BatchFileError, Problem, _Validator, _show, lone_surrogate
from gcr.errors import UsageError
from gcr.records import EDIT, T2I

KEYS = ("image", "prompt", "source", "id")
FORMATS = {".yaml": "yaml", ".yml": "yaml", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
MAX_PROMPT_BYTES = 64 * 1024   # as for a request (gcr.cli.common.MAX_REQUEST_BYTES)


@dataclass(frozen=True)
class ScoreEntry:
    """One image to score, validated. Paths are absolute; `shown` is the image as the user wrote it."""

    image: Path
    prompt: str
    source: Path | None = None
    id: str | None = None
    line: int | None = None        # where the entry starts in the manifest (None: the command line)
    index: int = 0                 # 1-based position
    shown: str = ""
    image_sha256: str = ""
    source_sha256: str | None = None

    @property
    def task(self) -> str:
        return EDIT if self.source is not None else T2I

    @property
    def label(self) -> str:
        """How tables name the entry: its id, else the image as written."""
        return self.id or self.shown or str(self.image)


class ManifestError(BatchFileError):
    """Every problem found in a manifest (or in the images given as arguments), reported at once."""

    def __init__(self, file: str, problems: list[Problem]):
        super().__init__(file, problems, outcome="nothing was scored")


def is_manifest(path) -> bool:
    """Whether a command-line input names a manifest (by its extension) rather than an image."""
    return Path(str(path)).suffix.lower() in FORMATS


def load_manifest(path) -> list[ScoreEntry]:
    """Read and validate a manifest; raise ManifestError listing every problem, or return the entries."""
    return _Manifest(Path(path)).run()


def entries_from_args(images, prompt: str, source=None) -> list[ScoreEntry]:
    """Images given on the command line, all judged against one prompt (and one source for edits):
    the same checks as a manifest's entries, problems listed at once."""
    v = _Manifest(Path("the command line"), base=Path.cwd())
    raw = [({"image": str(image), "prompt": prompt, **({"source": str(source)} if source is not None else {})},
            None) for image in images]
    entries = v.entries(raw)
    if v.problems:
        v.fail()
    return entries


class _Manifest(_Validator):
    """A batch file's validator (its YAML reader, image check and problem list), for manifests."""

    def __init__(self, path: Path, base: Path | None = None):
        super().__init__(path)
        if base is not None:
            self.base = base

    def add(self, line, job, message) -> None:
        key = (line, job, message)
        if key not in self._seen:
            self._seen.add(key)
            self.problems.append(Problem(line, job, message, kind="entry"))

    def fail(self):
        raise ManifestError(self.shown, self.problems)

    def run(self) -> list[ScoreEntry]:
        kind = FORMATS.get(self.path.suffix.lower())
        if kind is None:
            raise UsageError(f"{self.path} is not a manifest gcr reads: name it .yaml, .yml, .jsonl or .csv "
                             "(or give images and --prompt).")
        if kind == "yaml":
            raw = self._yaml()
        else:
            text = self.read_text("a manifest")
            raw = self._jsonl(text) if kind == "jsonl" else self._csv(text)
        if not raw and not self.problems:
            self.add(None, None, "has no entries: list the images to score (see `gcr score --help`)")
        entries = self.entries(raw)
        if self.problems:
            self.fail()
        return entries

    # -- the three formats: each gives (mapping, line) per entry ------------------------------

    def _yaml(self) -> list[tuple[dict, int]]:
        root, loader = self._parse()  # the batch files' bounded safe loader
        try:
            import yaml

            node = root
            if isinstance(root, yaml.MappingNode):  # `images:` holding the list is read the same
                pairs = {k: (n, line) for k, n, line in self._pairs(loader, root, None, "")}
                if list(pairs) != ["images"]:
                    self.add(root.start_mark.line + 1, None, "the manifest must be a list of entries "
                             "(`- image: a.png` / `  prompt: ...`), or a mapping with one key, `images:`")
                    return []
                node = pairs["images"][0]
            if not isinstance(node, yaml.SequenceNode):
                self.add(node.start_mark.line + 1, None, "the manifest must be a list of entries "
                         "(`- image: a.png` / `  prompt: ...`)")
                return []
            out = []
            for position, item in enumerate(node.value, start=1):
                line = item.start_mark.line + 1
                if not isinstance(item, yaml.MappingNode):
                    self.add(line, f"#{position}", "an entry must be a mapping with image and prompt")
                    out.append((None, line))
                    continue
                values = {}
                for key, value_node, _ in self._pairs(loader, item, f"#{position}", ""):
                    value, ok = self._construct(loader, value_node, f"#{position}")
                    values[key] = value if ok else _INVALID
                out.append((values, line))
            return out
        finally:
            loader.dispose()

    def _jsonl(self, text: str) -> list[tuple[dict, int]]:
        out = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line, parse_constant=_refuse_constant)
            except (ValueError, RecursionError) as e:
                what = (f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError)
                        else "NaN, Infinity or nesting too deep")
                self.add(number, None, f"not valid JSON ({what}): write one object per line, e.g. "
                                       '{"image": "a.png", "prompt": "a red fox"}')
                continue
            if not isinstance(value, dict):
                self.add(number, None, f"a line must hold a JSON object, not {_show(value)}")
                continue
            out.append((value, number))
        return out

    def _csv(self, text: str) -> list[tuple[dict, int]]:
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            header = next(reader, None)
        except csv.Error as e:
            self.add(1, None, f"CSV error: {e}")
            return []
        if header is None:
            return []
        columns = [h.strip().lower() for h in header]
        for needed in ("image", "prompt"):
            if needed not in columns:
                close = difflib.get_close_matches(needed, columns, n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                self.add(1, None, f"the header has no {needed!r} column{hint}: the first row names the columns, "
                                  "image and prompt at least")
        if self.problems:
            return []
        out, start = [], reader.line_num + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                self.add(start, None, f"CSV error: {e}")
                break
            if any(cell.strip() for cell in row):
                if len(row) > len(columns):
                    self.add(start, None, f"has {len(row)} cells but the header names {len(columns)} columns: "
                                          "quote cells that hold commas")
                else:
                    values = {c: cell for c, cell in zip(columns, row) if c in KEYS and cell.strip() != ""}
                    out.append((values, start))
            start = reader.line_num + 1
        return out

    # -- entries ----------------------------------------------------------------------------

    def entries(self, raw) -> list[ScoreEntry]:
        entries, ids, seen = [], {}, {}
        for index, (values, line) in enumerate(raw, start=1):
            entry = None if values is None else self._entry(values, line, index)
            if entry is None:
                continue
            if entry.id is not None:
                folded = entry.id.lower()  # a-1 and A-1 collide on case-insensitive file systems
                if folded in ids:
                    self.add(line, entry.id, f"duplicate id {entry.id!r}: already used {_where(ids[folded])}; "
                                             "ids must be unique")
                ids.setdefault(folded, line)
            same = (entry.image, entry.prompt, entry.source)
            if same in seen:
                self.add(line, entry.id or f"#{index}", f"the same image, prompt and source as {_where(seen[same])}: "
                                                        "remove one (each image is scored once)")
            seen.setdefault(same, line)
            entries.append(entry)
        return entries

    def _entry(self, values: dict, line, index: int) -> ScoreEntry | None:
        label = f"#{index}"
        unknown = [k for k in values if k not in KEYS]
        entry_id = values.get("id")
        if entry_id is not None and entry_id is not _INVALID:
            if isinstance(entry_id, int) and not isinstance(entry_id, bool):
                entry_id = str(entry_id)  # a JSON or YAML number written as an id
            if isinstance(entry_id, str) and _ID.match(entry_id):
                label = entry_id
            else:
                self.add(line, label, f"id {entry_id!r} is not file-name safe: use letters, digits, '-', '_' and "
                                      "'.', starting with a letter or digit, at most 64 characters"
                         if isinstance(entry_id, str) else f"id must be text, not {_show(entry_id)}")
                entry_id = None
        for key in unknown:
            close = difflib.get_close_matches(str(key), KEYS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (valid keys: {', '.join(KEYS)})"
            self.add(line, label, f"unknown key {key!r}{hint}")
        prompt = self._prompt(values.get("prompt"), line, label)
        image, image_hash = self._file(values.get("image"), "image", line, label)
        source, source_hash = (None, None)
        if values.get("source") is not None:
            source, source_hash = self._file(values["source"], "source", line, label)
            if source is None:
                return None
        if prompt is None or image is None or unknown:
            return None
        return ScoreEntry(image=image, prompt=prompt, source=source, id=entry_id if label != f"#{index}" else None,
                          line=line, index=index, shown=str(values["image"]).strip(), image_sha256=image_hash,
                          source_sha256=source_hash)

    def _prompt(self, value, line, label) -> str | None:
        if value is _INVALID:
            return None
        if value is None:
            self.add(line, label, "has no prompt: add `prompt: what the image should show`")
            return None
        if not isinstance(value, str):
            hint = " (YAML reads yes/no/on/off as true/false)" if isinstance(value, bool) else ""
            self.add(line, label, f"the prompt must be text, not {_show(value)}{hint}: put it in quotes")
            return None
        bad = lone_surrogate(value)
        if bad:
            self.add(line, label, f"the prompt holds {bad}, half of a character: write the character itself")
            return None
        if "\x00" in value:
            self.add(line, label, "the prompt holds a NUL byte: remove it")
            return None
        if not value.strip():
            self.add(line, label, "the prompt is empty: say what the image should show")
            return None
        if len(value.encode("utf-8")) > MAX_PROMPT_BYTES:
            self.add(line, label, f"the prompt is over {MAX_PROMPT_BYTES:,} bytes: shorten it to a paragraph")
            return None
        return value.strip()

    def _file(self, value, key: str, line, label):
        """(absolute path, sha256) of an image key, through gcr.images' check; (None, None) if it fails."""
        if value is _INVALID:
            return None, None
        if value is None:
            self.add(line, label, f"has no {key}: add `{key}: path/to/file.png`")
            return None, None
        if not isinstance(value, str) or not value.strip():
            self.add(line, label, f"{key} must be a file path, not {_show(value)}")
            return None, None
        bad = lone_surrogate(value)
        if bad:
            self.add(line, label, f"the {key} path holds bytes that are not UTF-8 text ({bad}): rename the file")
            return None, None
        path = (self.base / Path(value.strip()).expanduser()).resolve()
        if path not in self._images:  # each file is read once, however many entries use it
            self._images[path] = self._check_image(path)
        digest, error = self._images[path]
        if error:
            self.add(line, label, error if key == "image" else f"source: {error}")
            return None, None
        return path, digest


_INVALID = object()


def _where(line) -> str:
    return "on the command line" if line is None else f"on line {line}"


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a finite number")
