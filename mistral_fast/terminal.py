"""What a headless notebook run prints to the terminal: the text a reader needs, not a frontend's messages.

papermill logs each cell output the moment it arrives, as its ``text/plain``. Three kinds of output are
made for a live frontend and say nothing in a log (issue 26, seen in `mistral-fast demo`):

* tqdm's progress bars are ipywidgets in a kernel; the ``text/plain`` sent with a widget is its first frame
  (``Writing model shards:   0%|``) and the frames after it are widget updates a log never sees. Here a bar
  prints one line, its last frame, when it finishes (``bar_style`` success or danger), or at the end of its
  cell when it never did; a ``leave=False`` bar, which tqdm hides when done, prints nothing.
* Outputs updated in place (``display(..., display_id=True)``: transformers' notebook progress table) first
  show their empty start; they print once, their final content, at the end of the cell.
* Rich outputs whose only text is Python's default repr (``<IPython.core.display.HTML object>``): their
  HTML as text (tables row by row), else nothing.

Streams (print, logging) and outputs with a real text form pass unchanged. The output notebook keeps every
output as the kernel sent it; this module only decides what reaches the log.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from html.parser import HTMLParser
from typing import Any

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
_BAR_PARTS = ["HTMLModel", "FloatProgressModel", "HTMLModel"]  # tqdm.notebook's HBox: label, bar, counts
_BARE_REPR = re.compile(r"<[\w.]+ object( at 0x[0-9a-fA-F]+)?>")  # object.__repr__: no text form of its own


def tqdm_bar_parts(box: dict[str, Any] | None, state_of: Callable[[str], dict[str, Any]]) -> list[dict] | None:
    """The three child states of a tqdm widget box (label, FloatProgress, counts), or None for another widget.

    Args:
        box: the widget state of the displayed model (an ``HBox`` for tqdm), as the kernel sent it.
        state_of: a model id's widget state (``{}`` when unknown).
    """
    children = (box or {}).get("children") or []
    parts = [state_of(str(child).removeprefix("IPY_MODEL_")) for child in children]
    return parts if [p.get("_model_name") for p in parts] == _BAR_PARTS else None


def tqdm_bar_text(parts: list[dict[str, Any]]) -> str:
    """A tqdm widget's current frame as tqdm's text bar draws it: ``desc: 100%|██████████| 21/21 [...]``."""
    left, bar, right = parts
    filled = int(10 * bar.get("value", 0) / bar["max"]) if bar.get("max") else 0
    text = f"{html.unescape(left.get('value', ''))}|{'█' * filled}{' ' * (10 - filled)}|"
    return (text + html.unescape(right.get("value", ""))).replace("\u2007", " ")  # tqdm pads with figure spaces


def rich_text(data: dict[str, Any]) -> str | None:
    """The text form of a display's data: its ``text/plain``, unless that is a bare repr; then its HTML as
    text; None when it has neither (an image, a widget)."""
    plain = _joined(data.get("text/plain"))
    if plain is not None and not _BARE_REPR.fullmatch(plain.strip()):
        return plain
    markup = _joined(data.get("text/html"))
    if markup is None:
        return None
    return html_to_text(markup) or None


def _joined(value: Any) -> str | None:
    return "".join(value) if isinstance(value, list) else value


class _HtmlText(HTMLParser):
    """Collects an HTML fragment's text: one line per block or table row, `` | `` between cells."""

    BLOCKS = frozenset({"br", "div", "p", "tr", "table", "thead", "tbody", "h1", "h2", "h3", "h4", "li", "ul", "pre"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self.cells: list[str] = []
        self.chunk: list[str] = []
        self.hidden = 0

    def _break(self) -> None:
        self._end_cell(keep_empty=False)
        if self.cells:
            self.lines.append(" | ".join(self.cells))
        self.cells = []

    def _end_cell(self, keep_empty: bool) -> None:
        text = " ".join("".join(self.chunk).split())
        if text or keep_empty:
            self.cells.append(text)
        self.chunk = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in ("style", "script"):
            self.hidden += 1
        elif tag in self.BLOCKS:
            self._break()

    def handle_endtag(self, tag: str) -> None:
        if tag in ("style", "script"):
            self.hidden -= 1
        elif tag in ("td", "th"):
            self._end_cell(keep_empty=True)
        elif tag in self.BLOCKS:
            self._break()

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.chunk.append(data)


def html_to_text(markup: str) -> str:
    """Readable text of an HTML fragment (a table: one row per line, cells joined by `` | ``)."""
    parser = _HtmlText()
    parser.feed(markup)
    parser.close()
    parser._break()
    return "\n".join(parser.lines)


class TerminalLog:
    """Decides which outputs of a running notebook reach the log, and when; one per notebook run.

    The client calls `on_output` for each new output, `on_comm` after each widget message and `end_cell`
    when a cell ends; each returns the texts to log now.
    """

    def __init__(self, widget_state: Callable[[], dict[str, dict[str, Any]]]) -> None:
        self.widget_state = widget_state  # the client's live widget states, by model id (reset per execution)
        self.bars: dict[str, str] = {}  # progress bars not printed yet: FloatProgress model id -> box model id
        self.boxes: dict[str, str] = {}  # box model id -> FloatProgress model id
        self.updated: list[Any] = []  # outputs updated in place (display_id), printed when their cell ends

    def _state(self, model_id: str) -> dict[str, Any]:
        return self.widget_state().get(model_id, {})

    def on_output(self, output: Any, display_id: str | None) -> list[str]:
        """An output just arrived: its text now, or nothing now (a bar or an updatable output waits)."""
        data = output.get("data") or {}
        view = data.get(WIDGET_VIEW)
        if view:
            box_id = view.get("model_id", "")
            parts = tqdm_bar_parts(self._state(box_id), self._state)
            if parts is not None:
                bar_id = self._state(box_id)["children"][1].removeprefix("IPY_MODEL_")
                self.bars[bar_id], self.boxes[box_id] = box_id, bar_id
                return []
        if display_id:
            self.updated.append(output)
            return []
        text = rich_text(data)
        return [text] if text else []

    def on_comm(self, msg_type: str, model_id: str) -> list[str]:
        """A widget message: a bar that just finished (styled success or danger) prints its last frame.

        A bar whose box closes was made with ``leave=False``: tqdm hides it when done (in Jupyter as in a
        terminal), and its labels keep the last throttled frame, not the final count; it prints nothing.
        """
        if msg_type == "comm_close" and model_id in self.boxes:
            self.bars.pop(self.boxes.pop(model_id), None)
            return []
        if model_id in self.bars and self._state(model_id).get("bar_style") in ("success", "danger"):
            return self._finish(model_id)
        return []

    def _finish(self, bar_id: str) -> list[str]:
        box_id = self.bars.pop(bar_id)
        self.boxes.pop(box_id, None)
        parts = tqdm_bar_parts(self._state(box_id), self._state)
        return [tqdm_bar_text(parts)] if parts else []

    def end_cell(self) -> list[str]:
        """The cell ended: bars that never finished print their last frame; updated outputs their final text."""
        texts = [line for bar_id in list(self.bars) for line in self._finish(bar_id)]
        texts += [text for output in self.updated if (text := rich_text(output.get("data") or {}))]
        self.updated = []
        return texts
