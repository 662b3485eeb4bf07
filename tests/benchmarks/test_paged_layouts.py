"""The wan-1.3b page-layout table of docs/serving.md is what ``benchmarks/paged_attention.py`` computes:
pages held, dead/padding share, bytes held and reserved, and which kernels read the pages in place."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
from paged_attention import wan_page_layouts  # noqa: E402  (a script beside the benchmarks, not a package)

DOC_LAYOUT = {"1560-token pages": "1560-token pages (one frame)", "64-token pages": "64-token pages",
              "256-token pages": "**256-token pages**", "512-token pages": "512-token pages",
              "256-token pages, frames padded to 1792": "frames padded to 1792 tokens, 256-token pages"}
READERS = {"flex (CUDA, compiled)": "flex (CUDA, compiled)", "flash": "flash", "xformers": "xformers"}


def test_the_docs_page_layout_table_is_the_benchmarks() -> None:
    doc = (REPO / "docs" / "serving.md").read_text()
    rows = {cells[0]: cells for line in doc.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}
    layouts = wan_page_layouts(torch.bfloat16)
    assert [r["layout"] for r in layouts] == list(DOC_LAYOUT)
    for r in layouts:
        cells = rows[DOC_LAYOUT[r["layout"]]]
        held, dead, _peak, reserved, readers = cells[1:6]
        assert held == f"{r['steady_state_bytes'] / 1e9:.2f} GB ({r['steady_state_pages']} pages)", r["layout"]
        assert re.search(rf"\({r['waste_pct']:.3g} %\)|^0$", dead), (r["layout"], dead)
        assert reserved == f"{r['reserved_bytes'] / 1e9:.2f} GB", r["layout"]
        in_place = {name for name, path in r["paged_paths"].items() if path in ("direct", "split")}
        assert {name for name in READERS if READERS[name] in readers} == in_place, (r["layout"], readers)
