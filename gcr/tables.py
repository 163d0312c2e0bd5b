"""Tables that fit the terminal: free text gives way first, numbers and names never.

Rich elides a cell ("2…", "compl…") when a table is wider than the terminal. Here a column is
either free text (`free=True`: a prompt, a request, a description), which may wrap, or a value
(scores, times, statuses, ids, preset names), which is always shown whole. The layout is chosen when
the table is printed, for the width it is printed at, widest first:

1. a table: the free text wraps within its column, down to the column's `min_width`;
2. a table of the values, each row followed by its free text on lines of its own;
3. records: each row's first value, then `header value` pairs packed into lines, then its free text.

There are no box-drawing characters: columns are separated by spaces, so the output reads the same
in a pipe (where Rich also drops colours) as on a terminal.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions
from rich.measure import Measurement
from rich.padding import Padding
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

GAP = 2  # spaces between columns (padding 1 on each side, no edge padding)
INDENT = 2


@dataclass(frozen=True)
class Column:
    header: str                 # may hold "\n" to stack a two-word header ("best\nround")
    justify: str = "left"
    free: bool = False          # free text: wraps, or moves below its row; values never shrink
    min_width: int = 16         # free text narrower than this moves below its row instead


def width_of(cell: Text | str) -> int:
    plain = cell.plain if isinstance(cell, Text) else str(cell)
    return max((cell_len(line) for line in plain.split("\n")), default=0)


class FitTable:
    """A table whose layout is chosen for the width it is printed at (see the module notes)."""

    def __init__(self, columns: Sequence[Column], title: Text | str | None = None,
                 caption: Text | str | None = None):
        self.columns = list(columns)
        self.rows: list[tuple[tuple, str]] = []
        self.title, self.caption = title, caption

    def add_row(self, *cells: Text, style: str = "") -> None:
        self.rows.append((cells, style))

    # -- layout -----------------------------------------------------------------------------------

    def natural_widths(self) -> list[int]:
        return [max([width_of(c.header)] + [width_of(cells[i]) for cells, _ in self.rows])
                for i, c in enumerate(self.columns)]

    def table_widths(self, width: int) -> list[int] | None:
        """Widths for one table `width` cells wide (free text narrowed, widest first), or None."""
        widths = self.natural_widths()
        excess = sum(widths) + GAP * (len(widths) - 1) - width
        while excess > 0:
            free = [i for i, c in enumerate(self.columns) if c.free and widths[i] > self._floor(i)]
            if not free:
                return None
            i = max(free, key=lambda k: widths[k])
            step = min(excess, widths[i] - self._floor(i))
            widths[i] -= step
            excess -= step
        return widths

    def _floor(self, i: int) -> int:
        c = self.columns[i]
        return max(c.min_width, max((cell_len(w) for w in c.header.split()), default=1))

    def layout(self, width: int) -> str:
        """"table", "below" (free text under each row) or "records", for `width` cells."""
        if self.table_widths(width) is not None:
            return "table"
        values = [i for i, c in enumerate(self.columns) if not c.free]
        natural = self.natural_widths()
        fits = sum(natural[i] for i in values) + GAP * (len(values) - 1) <= width
        one_line = all("\n" not in _text(cells[i]).plain for cells, _ in self.rows for i in values)
        return "below" if values and fits and one_line and len(values) < len(self.columns) else "records"

    # -- rendering --------------------------------------------------------------------------------

    def __rich_console__(self, console: Console, options: ConsoleOptions):
        width = options.max_width
        if self.title is not None:
            yield _text(self.title, "bold")
        layout = self.layout(width)
        if layout == "table":
            yield self._table(self.columns, [cells for cells, _ in self.rows], self.table_widths(width))
        elif layout == "below":
            yield from self._below(console, options)
        else:
            yield from self._records(width)
        if self.caption is not None:
            yield _text(self.caption)

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        return Measurement(min(20, options.max_width), options.max_width)

    def _table(self, columns, rows, widths) -> Table:
        table = Table(box=None, pad_edge=False, padding=(0, 1), expand=False, show_edge=False,
                      header_style="bold")
        for c, w in zip(columns, widths):
            table.add_column(c.header, justify=c.justify, width=w, no_wrap=not c.free, overflow="fold")
        for cells, (_, style) in zip(rows, self.rows):
            table.add_row(*cells, style=style)
        return table

    def _below(self, console: Console, options: ConsoleOptions):
        """The values as a table, one line per row, each followed by the row's free text."""
        values = [i for i, c in enumerate(self.columns) if not c.free]
        natural = self.natural_widths()
        table = self._table([self.columns[i] for i in values],
                            [[cells[i] for i in values] for cells, _ in self.rows], [natural[i] for i in values])
        lines = console.render_lines(table, options, pad=False)
        header = max(c.header.count("\n") for c in self.columns) + 1
        for line in lines[:header]:
            yield from line
            yield Segment.line()
        for line, (cells, _) in zip(lines[header:], self.rows):
            yield from line
            yield Segment.line()
            for i, c in enumerate(self.columns):
                if c.free and _text(cells[i]).plain:
                    yield Padding(_text(cells[i]), (0, 0, 0, INDENT), expand=False)

    def _records(self, width: int):
        """One record per row: the first value, `header value` pairs packed into lines, free text."""
        for cells, _ in self.rows:
            line = _text(cells[0], "bold")
            for c, cell in zip(self.columns[1:], cells[1:]):
                if c.free or not _text(cell).plain:
                    continue
                pair = Text(c.header.replace("\n", " ") + " ", style="dim").append_text(_text(cell))
                if line.plain.strip() and cell_len(line.plain) + GAP + width_of(pair) > width:
                    yield line
                    line = Text(" " * INDENT)
                line.append(" " * GAP if line.plain.strip() else "").append_text(pair)
            yield line
            for c, cell in zip(self.columns[1:], cells[1:]):
                if c.free and _text(cell).plain:
                    yield Padding(_text(cell), (0, 0, 0, INDENT), expand=False)


def _text(value, style: str = "") -> Text:
    if isinstance(value, Text):
        return value.copy() if not style else Text.assemble(value, style=style)
    return Text(str(value), style=style)
