"""The report's text: docstring markup rendered as HTML, one ROI table per ROI."""

from __future__ import annotations

import numpy as np
import pandas as pd

from xrdscale.analysis import regions
from xrdscale.analysis.report import _Doc, _roi_tables


def test_region_criteria_render_without_raw_markup(tmp_path):
    doc = _Doc(str(tmp_path))
    text = regions.__doc__.split("Criteria (documented, configurable):", 1)[1].split("Codes:")[0]
    doc.rst(text)
    html = doc.parts[-1]
    assert "**" not in html and "``" not in html
    assert html.startswith("<ol><li><strong>LixC masses</strong>") and "<code>scale × ZMV/V²</code>" in html
    n_items = sum(1 for line in text.splitlines() if line.strip()[:2].rstrip(".").isdigit())
    assert n_items >= 5 and html.count("<li>") == n_items  # each numbered criterion is one list item


def test_one_table_per_roi_with_phases_by_variables(tmp_path):
    rows = [{"dataset": "d", "roi": roi, "phase": ph, "variable": var, "mean": m, "std": 0.01, "ensemble_std": 0.0,
             "n_pixels": n}
            for roi, n in (("cathode", 10), ("tab", 3)) for ph in ("NCA", "Al")
            for var, m in (("scale", 0.5), ("a", 2.84 if ph == "NCA" else 4.05), ("c", np.nan if ph == "Al" else 14.2))]
    doc = _Doc(str(tmp_path))
    _roi_tables(doc, pd.DataFrame(rows), "d")
    assert len(doc.parts) == 2
    assert "ROI cathode (10 pixels)" in doc.parts[0] and "ROI tab (3 pixels)" in doc.parts[1]
    table = pd.read_html(__import__("io").StringIO(doc.parts[0]))[0]
    assert list(table["phase"]) == ["NCA", "Al"] and {"scale", "a", "c"} <= set(table.columns)
    assert table.loc[0, "a"] == "2.84 ± 0.01" and table.loc[1, "c"] == "–"
