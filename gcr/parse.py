"""Read a RationalRewards critique: scores, texts, and what could not be read.

The critic is trained to write (see shared/reference/rationalrewards/README.md):

    # User Request Analysis          free text
    # Detailed Judgement
    1. Text Faithfulness:            one block per dimension, in DIMENSIONS[task] order
    ## Justification: ...            free text, may continue over several lines
    ## Score: 3.25                   a float in [1, 4]; Text Rendering may be N/A
    # Summary: ...
    # User Request Refinement:
    ## Refinement Comments: ...
    ## Refined Request: ...          the next generator prompt; may span paragraphs

How it is read: line by line, never one regex over the whole text (a 200 KB run of junk must
not backtrack). A line is a *header* when, after leading markup (`#`, `*`, `_`, `>`, spaces) and
an optional list number (`1.`, `1)`, `(1)`), it starts with a known label followed by `:` or
nothing; every other line is body text of the current section. Headers switch the section; the
order of sections does not matter. Tolerances, and why each exists:

- Any `#` count, `**bold**` around labels or values, any numbering, `Physical Quality` for
  `Physical and Visual Quality`: checkpoints and sampling drift in formatting, and the official
  code paths met these variants.
- Score before Justification; body text under a dimension without a `Justification:` label;
  the score value on the line after `Score:`; `Text Rendering: N/A` on the dimension line: where
  a value sits inside its block carries no meaning.
- No `# User Request Analysis` header: text before the first header is then the analysis.
- `3.5/4`, `3.5 out of 4`, `3.5 (minor flaws)`, `**3**`: the leading number is the score. A
  denominator other than 4 (`7/10`, `80%`) is a problem, never rescaled: guessing the mapping
  would silently make rounds incomparable. Likewise a value outside [1, 4] (`5`, `0`, `35`) or a
  non-finite one is a problem and the dimension is left out: a clamped number is a wrong number.
- `N/A`, `n/a`, `NA`, `N/A (no text requested)`, `Not applicable`, `None`: None (not a zero;
  excluded from the mean). N/A on a dimension other than text_rendering is kept as None but
  reported, since the rubric allows it only there.
- Multi-line sections are kept whole; the official parser keeps only the first line of the
  Refined Request, which truncates the next prompt.
- The Refined Request becomes the next prompt, so junk after it must not leak in: it ends at the
  next header, at any other `#` line, a code fence, a `---` rule or a chat token (`<|im_end|>`),
  and one pair of surrounding quotes or bold markers is removed.
- CRLF, a code fence around everything, a `<think>...</think>` prelude: transport noise.
- A literal backslash-n (the two characters `\\` and `n`, as in a published excerpt:
  `## Score: 2.0  \\n## Justification: ...`) is a line break where it can only be one: right
  before a header or a `#` line, at the end of a line, or anywhere in a text that has no real line
  break at all (a whole critique escaped onto one line). Elsewhere it is kept as written, so a
  prompt about code (`print("a\\nb")`) or a path (`C:\\new`) is not mangled.
- A score or section that appears twice: the first wins and a repeated score or Refined Request
  is reported (a model that repeats itself is usually re-echoing the template).
- An image_faithfulness score in a t2i critique is ignored and reported: the T2I critic sees no
  source image, and counting it would make t2i means incomparable.

`problems` lists what was missing or invalid among what the loop relies on: every expected
score and the Refined Request (analysis, summary and comments are optional). parse_critique
never raises on any text; an unknown `task` is a programmer error and raises ValueError.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from gcr.records import DIMENSIONS, EDIT, T2I

_ALL_DIMS = DIMENSIONS[EDIT]
_NA_ALLOWED = "text_rendering"

_LEAD = re.compile(r"[\s#*_>]*")  # leading markup: one linear run, nothing to backtrack
_NUMBERING = re.compile(r"\(?\d{1,3}[.)]?(?![\d.])\)?")
_LABEL = re.compile(
    r"(?:(?P<analysis>user\s+request\s+analysis)"
    r"|(?P<judgement>(?:detailed\s+)?judge?ment)"
    r"|(?P<refinement>user\s+request\s+refinement)"
    r"|(?P<refinement_comments>refinement\s+comments?)"
    r"|(?P<refined_request>refined\s+(?:user\s+)?(?:request|prompt|instruction))"
    r"|(?P<summary>summary)"
    r"|(?P<justification>justification)"
    r"|(?P<score>score)"
    r"|(?P<text_faithfulness>text\s+faithfulness)"
    r"|(?P<image_faithfulness>image\s+faithfulness)"
    r"|(?P<physical_quality>physical\s*(?:and|&|/)\s*visual\s+quality|physical\s+quality|visual\s+quality)"
    r"|(?P<text_rendering>text\s+rendering))\b",
    re.IGNORECASE,
)
_NA = re.compile(r"(?:n\s*/\s*a|n\.\s*a\.?|na|not\s+applicable|none)(?![a-z0-9])", re.IGNORECASE)
# Up to 20 decimals: a float as Python or a JSON encoder writes it (3.8823529411764706) is a number.
_NUMBER = re.compile(r"(?:\d{1,9}(?:[.,]\d{1,20})?|[.,]\d{1,20})")
_DENOMINATOR = re.compile(r"\s*(?:/|out\s+of\b|of\b)\s*(\d{1,9}(?:\.\d{1,9})?)", re.IGNORECASE)
_NON_FINITE = re.compile(r"[+-]?(?:nan|inf(?:inity)?)(?![a-z])", re.IGNORECASE)
# A value standing alone (inline on a dimension line or after `Score` without a colon).
_SCORE_ONLY = re.compile(
    r"(?:\d{1,3}(?:\.\d{1,20})?(?:\s*(?:/|out\s+of)\s*\d{1,3}(?:\.\d{1,9})?)?|n\s*/\s*a|na|not\s+applicable)"
    r"\s*(?:\([^()]{0,200}\))?\.?",
    re.IGNORECASE,
)
_CHAT_TOKEN = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>")
_STOP = "\x00"  # what a chat token becomes: a line that ends the Refined Request
_QUOTES = (('"', '"'), ("'", "'"), ("\u201c", "\u201d"), ("\u2018", "\u2019"), ("\u00ab", "\u00bb"), ("`", "`"))


@dataclass(frozen=True)
class Critique:
    """What one critique says. Dimensions missing or unreadable are absent from `scores`."""

    scores: dict = field(default_factory=dict)  # dimension -> float in [1, 4], or None for N/A
    overall: float | None = None  # mean of the float scores; None when there are none
    refined_request: str = ""  # the next prompt, whole ("" when absent)
    refinement_comments: str = ""
    summary: str = ""
    analysis: str = ""  # the User Request Analysis
    justifications: dict = field(default_factory=dict)  # dimension -> text
    problems: tuple = ()  # one sentence per thing missing or invalid; empty = clean critique
    missing: tuple = ()  # expected dimensions with neither a valid score nor an explicit N/A

    @property
    def readable(self) -> bool:
        return self.overall is not None

    @property
    def complete(self) -> bool:
        """Readable, and every expected dimension was judged (a score or N/A): only a complete
        critique may meet the target or beat another (gcr.decide)."""
        return self.readable and not self.missing


def parse_critique(text: str, task: str = T2I) -> Critique:
    """Parse critic output for `task` ("t2i" or "edit"). Never raises on any text."""
    if task not in DIMENSIONS:
        raise ValueError(f"unknown task {task!r}: expected one of {', '.join(DIMENSIONS)}")
    texts: dict = {}  # section -> body lines; a section is a label or ("just", dimension)
    raw_scores: dict = {}  # dimension -> raw score strings in order of appearance
    problems: list = []
    section, dim, pending = "preamble", None, None  # pending: dimension awaiting its score line
    request_started = False  # the Refined Request has text, so a stop line now ends it
    for line in _clean(text).split("\n"):
        line = line.rstrip()
        head = _header(line)
        if head is None:
            boundary = _boundary(line)
            if boundary and section == "refined_request" and request_started:
                section = None  # what follows the Refined Request is trailing junk
            if boundary == "drop":
                continue
            if pending and line.strip():
                raw_scores.setdefault(pending, []).append(line.strip())
                pending = None
            elif section is not None:
                texts.setdefault(section, []).append(line)
                request_started |= section == "refined_request" and bool(line.strip())
            continue
        label, rest = head
        pending = None
        if label in _ALL_DIMS:
            dim, section = label, ("just", label)
            if rest:
                raw_scores.setdefault(dim, []).append(rest)
            continue
        if label in ("justification", "score"):
            if dim is None:
                problems.append(f"a {label.title()} line outside any dimension was ignored")
                section = None
                continue
            section = ("just", dim)  # text after a score continues the justification
            if label == "score":
                if rest:
                    raw_scores.setdefault(dim, []).append(rest)
                else:
                    pending = dim
                continue
        else:
            dim = None
            if label in ("judgement", "refinement"):
                section = None
            elif label in texts:  # the first occurrence wins
                section = None
                if label == "refined_request":
                    problems.append("more than one Refined Request; kept the first")
            else:
                section = label
                texts[label] = []
        if section is not None and rest:
            texts.setdefault(section, []).append(rest)
            request_started |= section == "refined_request"
    return _build(task, texts, raw_scores, problems)


def _build(task: str, texts: dict, raw_scores: dict, problems: list) -> Critique:
    def text_of(key) -> str:
        return "\n".join(texts.get(key, ())).strip()

    expected = DIMENSIONS[task]
    scores = {}
    for dim in expected:
        raws = raw_scores.get(dim)
        if not raws:
            problems.append(f"{dim}: no score found")
            continue
        if len(raws) > 1:
            problems.append(f"{dim}: scored {len(raws)} times; kept the first")
        value, problem = _read_score(raws[0])
        if problem:
            problems.append(f"{dim}: {problem}")
            continue
        if value is None and dim != _NA_ALLOWED:
            problems.append(f"{dim}: marked N/A, which the rubric allows only for {_NA_ALLOWED}")
        scores[dim] = value
    for dim in raw_scores:
        if dim not in expected:
            problems.append(f"{dim}: not a {task} dimension; ignored")
    refined = _unwrap(text_of("refined_request"))
    if "refined_request" not in texts:
        problems.append("no Refined Request found")
    elif not refined:
        problems.append("the Refined Request is empty")
    values = [v for v in scores.values() if v is not None]
    return Critique(
        scores=scores,
        overall=math.fsum(values) / len(values) if values else None,
        refined_request=refined,
        refinement_comments=text_of("refinement_comments"),
        summary=text_of("summary"),
        analysis=text_of("analysis") if "analysis" in texts else text_of("preamble"),
        justifications={d: text_of(("just", d)) for d in expected if text_of(("just", d))},
        problems=tuple(problems),
        missing=tuple(d for d in expected if d not in scores),
    )


def _clean(text) -> str:
    """Undo transport noise: non-str input, CRLF, a <think> prelude, chat tokens."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    elif not isinstance(text, str):
        text = "" if text is None else str(text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "")
    text = _unescape_breaks(text)
    think_end = text.rfind("</think>")
    if think_end >= 0:
        text = text[think_end + len("</think>"):]
    return _CHAT_TOKEN.sub(f"\n{_STOP}\n", text)


# One literal `\n` (or `\r\n`), or a run of them with blanks between; `\\n` is an escaped backslash.
_ESCAPED_BREAK = re.compile(r"((?<!\\)(?:\\r)?\\n(?:[ \t]*(?:\\r)?\\n)*)")


def _unescape_breaks(text: str) -> str:
    """Literal backslash-n sequences that stand for line breaks become line breaks (see the module
    docstring for where); every other backslash-n is kept as written."""
    if "\\n" not in text:
        return text
    if "\n" not in text.strip():  # no real line break anywhere: the whole text was escaped
        return _ESCAPED_BREAK.sub(lambda m: "\n" * m.group().count("\\n"), text)
    lines = []
    for line in text.split("\n"):
        if "\\n" in line:
            parts = _ESCAPED_BREAK.split(line)  # text, separator, text, separator, ..., text
            out = [parts[0]]
            for sep, after in zip(parts[1::2], parts[2::2]):
                starts_line = not after.strip() or after.lstrip().startswith("#") or _header(after) is not None
                out.append("\n" * sep.count("\\n") if starts_line else sep)
                out.append(after)
            line = "".join(out)
        lines.append(line)
    return "\n".join(lines)


def _header(line: str):
    """(label, rest of the line) when `line` is a section header, else None."""
    s = line[_LEAD.match(line).end():]
    number = _NUMBERING.match(s)
    if number and number.end():
        s = s[number.end():]
        s = s[_LEAD.match(s).end():]
    m = _LABEL.match(s)
    if not m:
        return None
    label, rest = m.lastgroup, s[m.end():].lstrip("*_ \t")
    if rest.startswith("("):  # "Text Faithfulness (How accurately ...):"
        close = rest.find(")", 0, 300)
        if close > 0:
            rest = rest[close + 1:].lstrip("*_ \t")
    if rest.startswith((":", "\uff1a")):
        rest = rest[1:].lstrip("*_") if rest[1:2] in ("*", "_") else rest[1:]  # "**Score:** 3"
        rest = rest.strip()
        if label in _ALL_DIMS and rest and not _SCORE_ONLY.fullmatch(rest.strip("*_ ")):
            return None  # "Text rendering: the sign must read OPEN" is prose, not a header
        return label, rest
    if not rest:
        return label, ""
    if label in _ALL_DIMS + ("score",) and _SCORE_ONLY.fullmatch(rest.strip("*_ ")):
        return label, rest  # "## Score 3.5", "Text Rendering N/A"
    return None


def _read_score(raw: str):
    """(value, None) or (None, None) for N/A, or (None, problem)."""
    s = raw.strip().strip("*_`[]\"' \t").strip()[:200]
    if _NA.match(s):
        return None, None
    if _NON_FINITE.match(s):
        return None, f"score {s!r} is not a finite number"
    m = _NUMBER.match(s)
    after = s[m.end():] if m else ""
    if not m or after[:1].isalnum() or re.match(r"[.,]\d", after):
        return None, f"unreadable score {s[:60]!r}"
    value = float(m.group().replace(",", "."))
    denominator = _DENOMINATOR.match(after)
    if after.lstrip().startswith("%") or (denominator and float(denominator.group(1)) != 4):
        return None, f"score {s[:60]!r} is not on the 1-4 scale"
    if not 1.0 <= value <= 4.0:
        return None, f"score {value:g} is outside 1-4"
    return value, None


def _boundary(line: str):
    """"drop" for transport lines (chat token, code fence, rule), "end" for another # header, else None."""
    bare = "".join(line.split())
    rule = len(bare) >= 3 and len(set(bare)) == 1 and bare[0] in "-*_="
    if line == _STOP or rule or bare.startswith(("```", "~~~")):
        return "drop"
    return "end" if bare.startswith("#") else None


def _unwrap(s: str) -> str:
    """Remove one pair of surrounding bold markers and one pair of matching quotes."""
    def unbold(s: str) -> str:
        for mark in ("**", "__"):
            if len(s) > 4 and s.startswith(mark) and s.endswith(mark) and mark not in s[2:-2]:
                return s[2:-2].strip()
        return s

    s = unbold(s)
    for left, right in _QUOTES:
        if len(s) >= 2 and s[0] == left and s[-1] == right and left not in s[1:-1] and right not in s[1:-1]:
            return unbold(s[1:-1].strip())
    return s
