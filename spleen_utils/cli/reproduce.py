"""``spleen-seg reproduce``: every notebook re-executed, the book built, the headline results printed
(:mod:`spleen_utils.reproduce`)."""

from __future__ import annotations

import argparse

from ..errors import SpleenError


def cmd_reproduce(a: argparse.Namespace) -> int:
    from ..reproduce import parse_parameters, refresh_notebooks, reproduce

    if a.refresh_only:
        refresh_notebooks(a.profile)
        return 0
    import importlib.util

    if importlib.util.find_spec("papermill") is None:
        raise SpleenError("papermill is not installed here; run `make env` (it installs the [book] extra).")
    overrides = parse_parameters(a.param)
    if a.refresh and overrides:
        raise SpleenError("--refresh stores outputs that nbval re-runs with the defaults; drop the -p overrides.")
    if a.book_only and (overrides or a.only or a.no_book):
        raise SpleenError("--book-only builds the book from the last executed notebooks; it takes no -p, --only or --no-book.")
    reproduce(a.profile, overrides, a.only, book=not a.no_book, refresh=a.refresh, book_only=a.book_only)
    return 0


def register(subparsers) -> None:
    r = subparsers.add_parser(
        "reproduce",
        help="re-execute every notebook (papermill), build the book and print the headline results",
        description="Execute notebooks/NN_*.ipynb in order into outputs/notebooks/<profile>/, build the book into "
        "_build/html from those executed copies, and print the headline results.",
    )
    r.add_argument("--profile", choices=["quick", "full"], default="quick")
    r.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a notebook parameter for development, e.g. -p epochs=2 (outputs of such a run cannot be refreshed)")
    r.add_argument("--only", nargs="+", metavar="NN", help="run only these notebooks (name prefixes, e.g. 03 04)")
    r.add_argument("--no-book", action="store_true", help="execute the notebooks but do not build the book")
    r.add_argument("--book-only", action="store_true", help="only build the book from the last executed notebooks")
    r.add_argument("--refresh", action="store_true", help="afterwards copy the executed notebooks into notebooks/ (quick profile)")
    r.add_argument("--refresh-only", action="store_true",
                   help="only copy the last executed quick-profile notebooks into notebooks/ (make refresh-notebooks)")
    r.set_defaults(func=cmd_reproduce)
