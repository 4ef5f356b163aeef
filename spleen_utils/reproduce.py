"""Re-execute the tutorial, build the book, and report the headline results.

``spleen-seg reproduce --profile quick`` (what ``make reproduce`` runs):

1. executes ``notebooks/NN_*.ipynb`` in order with papermill (working directory: ``notebooks/``,
   kernel: this Python, registered as the ``spleen-seg`` kernelspec), injecting ``profile``;
   executed copies go to ``outputs/notebooks/<profile>/`` and the committed notebooks are not
   touched. The first failing notebook stops the run with one sentence naming it and its cell;
2. executes the book's introduction (``book/intro.ipynb``, whose results table is read from the run
   records), stages a copy of the book that uses the executed notebooks, and builds it with
   Jupyter Book 1.x (``execute_notebooks: off``, warnings are errors) into ``_build/html``;
3. prints a short table of the headline results read from the run records.

``spleen-seg reproduce --refresh-only`` (``make refresh-notebooks``) copies the executed
quick-profile notebooks back into ``notebooks/`` as their stored outputs, without papermill's
injected-parameters cell and metadata, so ``pytest --nbval`` compares against a real quick run.

It holds only the notebook runner, the book build and the results read from the run records;
the notebooks' own helpers live with their stage (:mod:`spleen_utils.runs`: preparing a profile's
data and training it once; :mod:`spleen_utils.evaluate`: predicting and scoring cases;
:mod:`spleen_utils.provenance`: versions and the environment report).
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from .config import PROJECT_ROOT, get_config
from .errors import SpleenError
from .progress import Watcher
from .evaluate import real_role
from .provenance import read_json as _read_json
from .provenance import write_json
from .runs import EXPORT_REPORT, RUN_RECORD, SUMMARY, RunDir, rel

NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"
BOOK_DIR = PROJECT_ROOT / "book"
INTRO = BOOK_DIR / "intro.ipynb"
EXECUTED_DIR = PROJECT_ROOT / "outputs" / "notebooks"
STAGING_DIR = PROJECT_ROOT / "outputs" / "book"
KERNEL_NAME = "spleen-seg"
KERNEL_DISPLAY = "Python (spleen-seg)"
#: metadata papermill and nbclient add to a notebook; none of it belongs in a committed notebook
_NB_NOISE = ("papermill",)
_CELL_NOISE = ("papermill", "execution")


# ---------------------------------------------------------------------------------------------
# headline results from the run records


def headline_results(profile: str = "quick") -> list[tuple[str, str]]:
    """(what, value) rows read from ``outputs/runs/<profile>/``; ``not run`` where a record is missing."""
    out = RunDir.of(profile)
    summary = out.read(SUMMARY) or {}
    run = out.read(RUN_RECORD) or {}
    rows: list[tuple[str, str]] = [("profile", profile)]
    if not summary:
        rows.append(("training", f"not run (no {rel(out.summary)})"))
        return rows
    data = summary.get("dataset", "?") + (" (synthetic)" if summary.get("synthetic") else "")
    if summary.get("real_train"):
        data += " + real " + ", ".join(summary["real_train"])
    rows.append(("data", f"{data}: {summary.get('n_train')} training / {summary.get('n_val')} validation cases"))
    hw = run.get("hardware", {})
    device = summary.get("device", "?")
    where = hw.get("gpu") if device.startswith("cuda") else hw.get("cpu")
    rows.append(("device", f"{device} ({where}), {summary.get('precision', '?')}" if where else device))
    rows.append(("epochs", f"{summary.get('epochs')} of {summary.get('epochs_planned')}"))
    by_source = summary.get("best_val_dice_by_source") or {}
    detail = f"; per source {', '.join(f'{k} {v:.3f}' for k, v in by_source.items())}" if by_source else ""
    rows.append(("best validation Dice", f"{summary['best_val_dice']:.3f} at epoch {summary.get('best_epoch')} (resampled grid{detail})"))
    rows.append(("training time", f"{summary.get('train_seconds', 0) / 60:.1f} min"))
    ev = out.read("eval/validation.json")
    if ev and ev.get("n"):
        hd = "n/a" if ev.get("mean_hd95_mm") is None else f"{ev['mean_hd95_mm']:.1f} mm"
        rows.append(("held-out Dice / HD95", f"{ev['mean_dice']:.3f} / {hd} ({ev['n']} cases, original grid)"))
    else:
        rows.append(("held-out Dice / HD95", "not run (notebook 03)"))
    real = out.read("eval/real.json")
    if real and real.get("n"):
        cfg = get_config(profile)
        parts = [f"{c['name']} {c['dice']:.3f} ({real_role({'name': c['name'], 'shipped': c['name'] != 'ircad_1'}, cfg)})"
                 for c in real["cases"]]
        rows.append(("real CT Dice (original grid)", ", ".join(parts)))
    preds = out.read("predictions/validation.json")
    if preds:
        t = sorted(r["timings"]["total_s"] for r in preds)
        rows.append(("inference per case", f"{t[len(t) // 2]:.1f} s median over {len(t)} cases ({preds[0].get('backend', '?')})"))
    export = out.read(EXPORT_REPORT)
    if export:
        diff = max(export.get("max_abs_diff", {}).values() or [float("nan")])
        rows.append(("ONNX export", f"opset {export.get('opset')}, largest difference from PyTorch {diff:.1e}"))
    backends = out.read("eval/backends.json")
    if backends and backends.get("summary", {}).get("min_agreement"):
        pairs = backends["summary"]["min_agreement"]
        rows.append(("backend agreement", ", ".join(f"{k.replace('|', ' vs ')} {v:.4f}" for k, v in pairs.items())
                     + " (smallest Dice between the two masks over all cases)"))
    bench = out.read("bench/bench.json")
    if bench and bench.get("patch", {}).get("rows"):
        best = min(bench["patch"]["rows"], key=lambda r: r["ms_per_patch"])
        where = (bench.get("hardware") or {}).get("gpu") or (bench.get("hardware") or {}).get("cpu")
        rows.append(("fastest patch", f"{best['ms_per_patch']:.0f} ms per {'x'.join(map(str, bench['patch']['patch']))} patch, "
                                      f"{best['backend']} {best['precision']} batch {best['batch']} ({where})"))
    e2e = (bench or {}).get("end_to_end", {})
    if e2e.get("cases"):
        n = len(e2e["cases"])
        names = ", ".join(c.get("name", "?") for c in e2e["cases"])
        rows.append(("end to end vs MONAI tutorial pipeline",
                     f"{e2e['speedup_geomean']:.1f}x faster (geometric mean over {n} file{'s' if n != 1 else ''}: {names}), "
                     f"mask Dice agreement at least {e2e['dice_agreement_min']:.3f}"))
    return rows


def profile_note(profile: str = "quick") -> str:
    """One paragraph under the results table: where the numbers come from."""
    summary = RunDir.of(profile).read(SUMMARY) or {}
    record = _read_json(EXECUTED_DIR / profile / "reproduce.json") or {}
    run = RunDir.of(profile).read(RUN_RECORD) or {}
    parts = []
    if summary.get("synthetic"):
        real = ", ".join(summary.get("real_train") or []) or "no real scan"
        parts.append(f"These numbers come from the `{profile}` profile, a teaching model trained in minutes on a CPU on "
                     f"**generated** CT (phantoms and CT painted on the anatomy of real people) and {real}. Its validation "
                     "Dice is measured on generated cases and shows that the pipeline works; the real-CT row is the measure "
                     "of what it learned, on scans it never trained on except where it says so. It is not a clinical model.")
    elif summary:
        parts.append(f"These numbers come from the `{profile}` profile on {summary.get('dataset')}.")
    if record.get("seconds"):
        hw = run.get("hardware") or {}
        where = hw.get("gpu") or hw.get("cpu", "this machine")
        sentence = f"Executing the notebooks took {record['seconds'] / 60:.0f} min on {where} ({hw.get('cpu_threads', hw.get('cpu_count', '?'))} CPU cores)"
        nb02 = record.get("notebooks", {}).get("02_training.ipynb", {}).get("seconds")
        if nb02 is not None and summary.get("train_seconds") and nb02 < summary["train_seconds"]:
            sentence += f"; notebook 02 reused a finished training run of the same configuration and data ({summary['train_seconds'] / 60:.0f} min of training)"
        parts.append(sentence + ".")
    if not parts:
        parts.append("No run records were found: run `make reproduce` first.")
    return " ".join(parts)


def results_markdown(profile: str = "quick") -> str:
    """The headline results as a Markdown table (the book's introduction shows it)."""
    lines = ["| result | value |", "|---|---|"]
    lines += [f"| {k} | {v.replace('|', '/')} |" for k, v in headline_results(profile)]
    return "\n".join(lines)


def print_results(profile: str, file=None) -> None:
    rows = headline_results(profile)
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}", file=file or sys.stdout)


# ---------------------------------------------------------------------------------------------
# executing the notebooks


def notebook_paths(only: Sequence[str] | None = None) -> list[Path]:
    """The numbered notebooks in order; ``only`` keeps those whose name starts with one of its items."""
    paths = sorted(p for p in NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
    if not paths:
        raise SpleenError(f"{NOTEBOOKS_DIR}: no numbered notebooks (NN_name.ipynb) to run.")
    if only:
        picked = [p for p in paths if any(p.name.startswith(o) for o in only)]
        if not picked:
            raise SpleenError(f"no notebook matches {', '.join(only)} (have: {', '.join(p.stem for p in paths)}).")
        paths = picked
    return paths


def ensure_kernel() -> str:
    """A kernelspec that starts this very Python: ``spleen-seg`` (installed into sys.prefix if missing)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    ksm = KernelSpecManager()
    try:
        spec = ksm.get_kernel_spec(KERNEL_NAME)
        exe = spec.argv[0]
        if exe in ("python", "python3") or Path(exe).resolve() == Path(sys.executable).resolve() or Path(exe) == Path(sys.executable):
            return KERNEL_NAME
    except NoSuchKernel:
        pass
    try:
        from ipykernel.kernelspec import install

        install(kernel_name=KERNEL_NAME, display_name=KERNEL_DISPLAY, prefix=sys.prefix)
        return KERNEL_NAME
    except Exception:
        # jupyter_client starts a spec whose argv[0] is "python" with the calling interpreter
        return "python3"


def parse_parameters(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` strings; values are JSON when they parse (``2``, ``true``, ``null``), else text."""
    params: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise SpleenError(f"a notebook parameter must look like key=value, not {item!r}.")
        k, v = item.split("=", 1)
        try:
            params[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            params[k.strip()] = v
    return params


def declared_parameters(path: Path) -> dict[str, Any]:
    """The parameters a notebook declares in its ``parameters`` cell, with their defaults."""
    import papermill as pm

    return {k: v for k, v in pm.inspect_notebook(str(path)).items()}


def execute_notebook(src: Path, dst: Path, parameters: dict[str, Any], kernel: str, cwd: Path) -> float:
    """Run one notebook with papermill; returns its wall time. Raises SpleenError naming the failing cell."""
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    t0 = time.perf_counter()
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        pm.execute_notebook(
            str(src), str(dst), parameters=parameters, kernel_name=kernel, cwd=str(cwd),
            progress_bar=False, log_output=False, request_save_on_cell_execute=True,
            # the kernel's own start-up log (e.g. "running over TCP without encryption") is noise here
            extra_arguments=["--IPKernelApp.log_level=ERROR"],
        )
    except PapermillExecutionError as e:
        evalue = " ".join(str(e.evalue).split())
        if len(evalue) > 300:
            evalue = evalue[:300] + "..."
        what = f"{e.ename}: {evalue}" if evalue else f"{e.ename} (an assert or check in that cell failed)"
        raise SpleenError(
            f"{src.name} failed at cell [{e.exec_count}] with {what}; the executed copy with the traceback is {rel(dst)}."
        ) from None
    return time.perf_counter() - t0


def run_notebooks(profile: str, overrides: dict[str, Any] | None = None, only: Sequence[str] | None = None,
                  out_dir: Path | None = None, log=print) -> dict[str, Any]:
    """Execute the numbered notebooks in order into ``outputs/notebooks/<profile>/``; returns the run record."""
    overrides = dict(overrides or {})
    out_dir = Path(out_dir or EXECUTED_DIR / profile)
    kernel = ensure_kernel()
    paths = notebook_paths(only)
    unknown = set(overrides)
    for p in paths:
        unknown -= set(declared_parameters(p))
    if unknown:
        raise SpleenError(f"no notebook declares the parameter(s) {', '.join(sorted(unknown))}.")
    record: dict[str, Any] = {"profile": profile, "overrides": overrides, "kernel": kernel, "notebooks": {}}
    started = time.perf_counter()
    # the kernels report their long steps (data, training, benchmark) to a file this process prints
    with Watcher(out_dir / "progress.jsonl", log=log):
        for p in paths:
            declared = declared_parameters(p)
            params = {k: v for k, v in {"profile": profile, **overrides}.items() if k in declared}
            log(f"[{time.strftime('%H:%M:%S')}] {p.name} ...")
            seconds = execute_notebook(p, out_dir / p.name, params, kernel, NOTEBOOKS_DIR)
            record["notebooks"][p.name] = {"seconds": round(seconds, 1), "parameters": params}
            log(f"           {p.name} done in {seconds:.0f} s")
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    old = _read_json(out_dir / "reproduce.json") or {}
    if only and old.get("profile") == profile:  # keep the record of the notebooks not re-run
        merged = dict(old.get("notebooks", {}))
        merged.update(record["notebooks"])
        record["notebooks"] = merged
    write_json(record, out_dir / "reproduce.json")
    return record


#: a line a notebook prints when it leaves something out ("skipped: ...", "not run: ...")
#: optionally after a short name: "  tensorrt     not run: why"
_SKIP_LINE = re.compile(r"^\s*(?:([\w.+-]+(?: [\w.+-]+)?)\s+)?(?:skipped|not run)\s*:\s*(.+)$", re.IGNORECASE)


def skipped_steps(executed: Path | None = None, profile: str = "quick") -> list[str]:
    """What the executed notebooks said they skipped or did not run, once each, in page order.

    Read from their printed output (every notebook says ``skipped: ...`` or ``not run: ...`` in
    one line when it leaves something out), plus the validation-only real scan when it is absent.
    """
    import nbformat

    executed = Path(executed or EXECUTED_DIR / profile)
    found: dict[str, str] = {}
    for p in notebook_paths():
        path = executed / p.name
        if not path.exists():
            continue
        nb = nbformat.read(str(path), as_version=4)
        for cell in nb.cells:
            for out in cell.get("outputs", []):
                if out.get("output_type") != "stream":
                    continue
                for line in str(out.get("text", "")).splitlines():
                    m = _SKIP_LINE.match(line)
                    if m:
                        what = " ".join(m.group(2).split())
                        if m.group(1):
                            what = f"{m.group(1)}: {what}"
                        found.setdefault(what.lower(), f"{p.stem}: {what}")
    from . import samples

    if not samples.validation_cases():
        found.setdefault("ircad_1", "real-CT validation on ircad_1: the scan is not here "
                                    "(set SPLEEN_REAL_DATA or place it in ../shared/data/real)")
    return list(found.values())


# ---------------------------------------------------------------------------------------------
# the book


def stage_book(profile: str, executed: Path | None = None, staging: Path | None = None) -> Path:
    """A copy of the book's sources that uses the executed notebooks (``outputs/book/<profile>/`` by default)."""
    executed = Path(executed or EXECUTED_DIR / profile)
    staging = Path(staging or STAGING_DIR / profile)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(PROJECT_ROOT / name, staging / name)
    shutil.copytree(BOOK_DIR, staging / "book", ignore=shutil.ignore_patterns("_build", ".ipynb_checkpoints", "intro.ipynb"))
    (staging / "notebooks").mkdir()
    import nbformat

    missing = []
    for p in notebook_paths():
        src = executed / p.name
        if not src.exists():
            missing.append(p.name)
            continue
        # a page shows the notebook's own parameters cell, not papermill's injected copy under it
        nbformat.write(clean_notebook(nbformat.read(str(src), as_version=4)), str(staging / "notebooks" / p.name))
    if missing:
        raise SpleenError(f"no executed copy of {', '.join(missing)} in {rel(executed)}; run `spleen-seg reproduce` first.")
    intro = executed / "intro.ipynb"
    if not intro.exists():
        raise SpleenError(f"no executed introduction in {rel(executed)}; run `spleen-seg reproduce` first.")
    # the introduction reads as a page: no papermill parameters cell
    nbformat.write(clean_notebook(nbformat.read(str(intro), as_version=4)), str(staging / "book" / "intro.ipynb"))
    return staging


def jupyter_book_command() -> list[str]:
    exe = Path(sys.executable).parent / "jupyter-book"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("jupyter-book")
    if found:
        return [found]
    raise SpleenError("jupyter-book is not installed in this environment; run `make env` (it installs .[book]).")


def build_book(staging: Path, path_output: Path = PROJECT_ROOT, quiet: bool = True) -> Path:
    """Jupyter Book 1.x, HTML, warnings as errors; returns ``_build/html/index.html``."""
    html = Path(path_output) / "_build" / "html"
    if html.exists():
        shutil.rmtree(html)  # no page of an older build survives
    cmd = jupyter_book_command() + ["build", str(staging), "--builder", "html", "--path-output", str(path_output), "-W", "--all"]
    proc = subprocess.run(cmd, cwd=str(staging), capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in (proc.stdout + "\n" + proc.stderr).splitlines() if line.strip()]
        important = [line for line in lines if "WARNING" in line or "ERROR" in line or "Error" in line] or lines[-15:]
        raise SpleenError("the book build failed: " + " | ".join(important[:5]))
    index = html / "index.html"
    if not index.exists():
        raise SpleenError(f"the book build finished but wrote no {index}.")
    return index


# ---------------------------------------------------------------------------------------------
# refreshing the committed notebooks


def clean_notebook(nb) -> Any:
    """A papermill-executed notebook as it should be committed: no injected-parameters cell, no
    papermill/nbclient metadata, execution counts renumbered from 1."""
    nb = copy.deepcopy(nb)
    nb.cells = [c for c in nb.cells if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    for k in _NB_NOISE:
        nb.metadata.pop(k, None)
    count = 0
    for cell in nb.cells:
        for k in _CELL_NOISE:
            cell.metadata.pop(k, None)
        if cell.cell_type != "code":
            continue
        if cell.get("execution_count") is not None:
            count += 1
            cell.execution_count = count
            for out in cell.get("outputs", []):
                if "execution_count" in out:
                    out["execution_count"] = count
    nb.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": KERNEL_DISPLAY, "language": "python"}
    return nb


def _cell_sources(nb) -> list[tuple[str, str]]:
    """What a notebook says (cell types and sources, papermill's injected cell left out): an
    executed copy is current when it says the same as the notebook, whatever the files' times."""
    return [(c.cell_type, c.source) for c in clean_notebook(nb).cells]


def refresh_notebooks(profile: str = "quick", executed: Path | None = None, log=print) -> list[Path]:
    """Copy the executed notebooks of a default-parameter run back into ``notebooks/`` (cleaned)."""
    import nbformat

    if profile != "quick":
        raise SpleenError("only the quick profile's outputs are stored in notebooks/ (that is what CI re-runs).")
    executed = Path(executed or EXECUTED_DIR / profile)
    record = _read_json(executed / "reproduce.json")
    if record is None:
        raise SpleenError(f"no executed notebooks in {rel(executed)}; run `make reproduce` first.")
    written = []
    for p in notebook_paths():
        src = executed / p.name
        ran = record.get("notebooks", {}).get(p.name)
        if not src.exists() or ran is None:
            raise SpleenError(f"{rel(src)} was not executed by the last reproduce run; run `make reproduce` first.")
        extra = {k: v for k, v in ran.get("parameters", {}).items() if k != "profile"}
        if extra:
            raise SpleenError(
                f"{p.name} last ran with non-default parameters {extra}; nbval re-runs the defaults, "
                "so re-run `make reproduce` without -p overrides before refreshing."
            )
        if _cell_sources(nbformat.read(str(src), as_version=4)) != _cell_sources(nbformat.read(str(p), as_version=4)):
            raise SpleenError(f"{p.name} changed after its executed copy was made; run `make reproduce` first.")
    for p in notebook_paths():
        nb = nbformat.read(str(executed / p.name), as_version=4)
        if any(o.get("output_type") == "error" for c in nb.cells for o in c.get("outputs", [])):
            raise SpleenError(f"{rel(executed / p.name)} holds an error output; fix it and re-run `make reproduce`.")
        nbformat.write(clean_notebook(nb), str(p))
        written.append(p)
        log(f"refreshed {rel(p)}")
    return written


# ---------------------------------------------------------------------------------------------
# the command


def reproduce(profile: str = "quick", overrides: dict[str, Any] | None = None, only: Sequence[str] | None = None,
              book: bool = True, refresh: bool = False, book_only: bool = False, log=print) -> Path | None:
    """Execute the notebooks, the introduction and the book; print where the book is and the results.

    ``book_only`` skips the numbered notebooks and builds the book from the last executed copies.
    """
    t0 = time.perf_counter()
    executed = EXECUTED_DIR / profile
    if book_only:
        record = _read_json(executed / "reproduce.json")
        if record is None:
            raise SpleenError(f"no executed notebooks in {rel(executed)}; run `spleen-seg reproduce` first.")
        record["kernel"] = ensure_kernel()
    else:
        record = run_notebooks(profile, overrides, only, log=log)
    kernel = record["kernel"]
    index = None
    if book:
        log(f"[{time.strftime('%H:%M:%S')}] book/intro.ipynb ...")
        execute_notebook(INTRO, executed / "intro.ipynb", {"profile": profile}, kernel, BOOK_DIR)
        log(f"[{time.strftime('%H:%M:%S')}] building the book (Jupyter Book, warnings as errors) ...")
        tb = time.perf_counter()
        index = build_book(stage_book(profile, executed))
        record["book_seconds"] = round(time.perf_counter() - tb, 1)
    if not book_only:
        record["total_seconds"] = round(time.perf_counter() - t0, 1)
    record["skipped"] = skipped = skipped_steps(executed)
    write_json(record, executed / "reproduce.json")
    if refresh:
        refresh_notebooks(profile, executed, log=log)
    log("")
    log(f"executed notebooks: {rel(executed)}/")
    if index is not None:
        log(f"the book: {rel(index)}  (open file://{index})")
    if book_only:
        log(f"book built in {record['book_seconds']:.0f} s from the notebooks executed at {record.get('finished', '?')}")
    else:
        log(f"wall time: {record['total_seconds'] / 60:.1f} min "
            f"(notebooks {record['seconds'] / 60:.1f} min" + (f", book {record['book_seconds']:.0f} s)" if book else ")"))
    log("headline results (from the run records):")
    print_results(profile)
    log("")
    if skipped:
        log("skipped or not run on this machine (each notebook says why):")
        for line in skipped:
            log(f"  - {line}")
    else:
        log("nothing was skipped.")
    return index
