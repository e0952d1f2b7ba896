"""What a headless notebook run logs (issue 26): each progress bar once, finished; an output updated in
place once, final; HTML-only outputs as text; no kernel transport warning. The demo's own terminal is
checked in tests/test_demo.py; this drives the cases the demo does not reach (a bar closed without
`leave`, one never closed, a display updated by id) through a real papermill kernel."""

from __future__ import annotations

import logging
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_notebook

from mistral_fast.runner import run_notebook
from mistral_fast.terminal import rich_text

CELLS = [
    "from tqdm.auto import tqdm\nfor _ in tqdm(range(3), desc='kept'):\n    pass",
    "for _ in tqdm(range(4), desc='gone', leave=False):\n    pass",
    "stopped = tqdm(total=5, desc='stopped', mininterval=0)\nstopped.update(2)",  # never closed: last frame at cell end
    "from IPython.display import HTML, display\nshown = display(HTML('<b>starting</b>'), display_id=True)\n"
    "shown.update(HTML('<table><tr><th>step</th><th>loss</th></tr><tr><td>3</td><td>0.5</td></tr></table>'))",
    "print('plain text passes')",
]


def test_a_headless_run_logs_each_bar_once_finished_and_displays_final(tmp_path: Path, caplog) -> None:
    params = new_code_cell("n = 1  # unused")
    params.metadata["tags"] = ["parameters"]
    nb = new_notebook(cells=[params, *(new_code_cell(c) for c in CELLS)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "bars.ipynb")
    with caplog.at_level(logging.INFO, logger="papermill"):
        run_notebook(tmp_path / "bars.ipynb", output=tmp_path / "out.ipynb", cwd=tmp_path, timeout=120)
    logged = [r.getMessage().strip() for r in caplog.records if r.name == "papermill"]
    bars = [line for line in logged if "%|" in line]
    assert [b.split("|")[0] for b in bars] == ["kept: 100%", "stopped:  40%"], bars  # `gone`: leave=False, hidden
    assert [b.split("|")[2].split()[0] for b in bars] == ["3/3", "2/5"]
    assert "step | loss\n3 | 0.5" in logged and "starting" not in "\n".join(logged)
    assert "plain text passes" in logged
    assert not [line for line in logged if "without encryption" in line or " object>" in line]
    # the output notebook keeps what the kernel sent: widgets, and the display as last updated
    outputs = [o for cell in nbformat.read(tmp_path / "out.ipynb", 4).cells for o in cell.get("outputs", [])]
    assert sum("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs) == 3


def test_html_only_outputs_become_text_and_real_text_forms_pass() -> None:
    """IPython's own formatter makes the display data; pandas writes the HTML table and the reference rows."""
    import pandas as pd
    from IPython.core.formatters import DisplayFormatter
    from IPython.display import HTML

    frame = pd.DataFrame({"Step": [10, 20], "Training Loss": [1.85, 0.48]})
    data, _ = DisplayFormatter().format(HTML(frame.to_html(index=False)))
    assert data["text/plain"] == "<IPython.core.display.HTML object>"
    rows = [" | ".join(frame.columns)] + [" | ".join(map(str, row)) for row in frame.itertuples(index=False)]
    assert rich_text(data).splitlines() == rows
    data, _ = DisplayFormatter().format(frame)  # a DataFrame's text/plain is its own table: kept as it is
    assert rich_text(data) == repr(frame)
    assert rich_text({"text/plain": "<matplotlib.figure.Figure object at 0x7f00>", "image/png": "..."}) is None
