"""The built book, as a reader opens it: built here from the committed notebooks (Jupyter Book 1.x)."""

from __future__ import annotations

import re
import shutil

import nbformat
import pytest

from spleen_utils import reproduce

pytestmark = pytest.mark.skipif(shutil.which("jupyter-book") is None and not (
    __import__("pathlib").Path(__import__("sys").executable).parent / "jupyter-book").exists(),
    reason="jupyter-book is not installed (make env installs the [book] extra)")


@pytest.fixture(scope="module")
def html(tmp_path_factory):
    """Stage and build the book from executed copies that still hold papermill's injected cell."""
    tmp = tmp_path_factory.mktemp("book")
    executed = tmp / "executed"
    executed.mkdir()
    for p in reproduce.notebook_paths():
        nb = nbformat.read(str(p), as_version=4)
        at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
        injected = nbformat.v4.new_code_cell('# Parameters\nprofile = "quick"\nINJECTED_BY_PAPERMILL = True\n')
        injected.metadata["tags"] = ["injected-parameters"]  # as papermill leaves an executed copy
        nb.cells.insert(at + 1, injected)
        nbformat.write(nb, str(executed / p.name))
    shutil.copy2(reproduce.INTRO, executed / "intro.ipynb")
    staging = reproduce.stage_book("quick", executed, staging=tmp / "staging")
    index = reproduce.build_book(staging, path_output=tmp)
    return index.parent


def _pages(html):
    return {p.relative_to(html).as_posix(): p.read_text(encoding="utf-8") for p in html.rglob("*.html")
            if not p.relative_to(html).as_posix().startswith(("_static", "genindex", "search"))}


def test_no_page_shows_papermill_injected_cell(html):
    pages = _pages(html)
    assert len([p for p in pages if p.startswith("notebooks/")]) == len(reproduce.notebook_paths())
    for name, text in pages.items():
        assert "INJECTED_BY_PAPERMILL" not in text, name


def test_printed_output_wraps_and_tables_scroll_in_place(html):
    css = (html / "_static" / "custom.css").read_text()
    assert "pre-wrap" in css and "overflow-x: auto" in css
    for name, text in _pages(html).items():
        if 'http-equiv="Refresh"' not in text:  # index.html only redirects to the introduction
            assert "custom.css" in text, name


def test_pages_are_numbered_as_the_prose_calls_them(html):
    pages = _pages(html)
    for p in reproduce.notebook_paths():
        text = pages[f"notebooks/{p.stem}.html"]
        h1 = re.search(r"<h1>(.*?)<", text, re.S)
        assert h1 and h1.group(1).strip().startswith(f"{p.name[:2]} ·"), (p.name, h1 and h1.group(1))


def test_the_service_page_is_in_the_book_and_no_placeholder_is_left(html):
    pages = _pages(html)
    assert "book/service.html" in pages
    assert "service.html" in pages["book/intro.html"]
    for name, text in pages.items():
        assert "&lt;this repository&gt;" not in text, name
