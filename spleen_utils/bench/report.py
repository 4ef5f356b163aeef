"""Reading a benchmark record: its format, the text ``spleen-seg bench`` prints, the Markdown
notebook 08 shows, the targets met or missed, and the figure."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .end_to_end import AGREEMENT_TARGET, STAGES

#: the record's format (its top-level keys: format, date, hardware, versions, model, settings,
#: patch, end_to_end, load_average_1min_end; written by :func:`spleen_utils.bench.run_benchmark`)
BENCH_FORMAT = "spleen_utils.bench/1"


def stage_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per case and pipeline: the median seconds of each of :data:`STAGES` and their sum."""
    rows = []
    for c in record.get("end_to_end", {}).get("cases", []):
        for who in ("baseline", "default"):
            st = c.get("stages_s", {}).get(who)
            if st:
                rows.append({"case": c["name"], "pipeline": who, **{k: st[k] for k in STAGES}, "sum": sum(st[k] for k in STAGES)})
    return rows


def agreement_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per backend and precision: its masks' Dice with the tutorial's on each case, the
    minimum, whether it meets :data:`AGREEMENT_TARGET`, and its speed-up per case."""
    e = record.get("end_to_end", {})
    rows = []
    for a in e.get("agreement", []):
        row = {"pipeline": a["pipeline"] + (" (the default)" if a["default"] else ""), "backend": a["backend"]}
        row.update({f"Dice {k}": v for k, v in a["dice_by_case"].items()})
        row["min Dice"] = a["dice_min"]
        row[f">= {e.get('agreement_target', AGREEMENT_TARGET)}"] = "yes" if a["meets_target"] else "no"
        row.update({f"speed-up {k}": v for k, v in a["speedup_by_case"].items()})
        rows.append(row)
    return rows


def process_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per pipeline timed as a whole process: median wall time, the same work in a warm
    process, the difference (start-up), and the baseline's time over each."""
    w = record.get("end_to_end", {}).get("whole_process")
    if not w:
        return []
    rows = []
    for k, v in w["processes"].items():
        rows.append({"pipeline": k, "command": w["commands"].get(k, ""), "process s": v["median_s"],
                     "in a warm process s": w.get("in_process_s", {}).get(k), "start-up s": w.get("startup_s", {}).get(k),
                     "speed-up, whole process": w["speedup"].get(k) if k != "baseline" else None,
                     "speed-up, beyond start-up": w.get("speedup_beyond_startup", {}).get(k) if k != "baseline" else None})
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _text_table(rows: list[dict[str, Any]], indent: str = "    ") -> list[str]:
    if not rows:
        return []
    keys = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    out = [indent + "  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    out += [indent + "  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return out


def format_report(record: dict[str, Any]) -> str:
    """The record as the text ``spleen-seg bench`` prints."""
    hw = record.get("hardware", {})
    lines = [
        f"spleen-seg bench, {record.get('date')}",
        f"hardware: {hw.get('cpu')} ({hw.get('cpu_cores')} cores, {hw.get('cpu_threads')} threads, torch threads {hw.get('torch_threads')}, "
        f"native bf16: {'yes' if hw.get('cpu_bf16_native') else 'no'})" + (f"; GPU {hw['gpu']}" if hw.get("gpu") else "; no GPU"),
    ]
    if hw.get("load_average_1min") is not None:
        lines.append(
            f"load average (1 min): {hw['load_average_1min']} at the start, {record.get('load_average_1min_end')} at the end "
            f"(other processes share these {hw.get('cpu_threads')} CPUs: compare numbers side by side only)"
        )
    p = record.get("patch")
    if p:
        lines.append("")
        lines.append(f"(a) one {'x'.join(map(str, p['patch']))} patch: {p['gflops_per_patch']:.1f} GFLOP per patch (FlopCounterMode)")
        mm = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in p["matmul_gflops"].items() if v)
        lines.append(f"    reference: a 2048^2 matrix product here runs at {mm}")
        lines.append(f"    {'backend':<9}{'precision':<10}{'device':<8}{'batch':>5}{'median ms':>11}{'p10':>9}{'p90':>9}{'ms/patch':>10}{'GFLOP/s':>9}{'peak RSS MB':>12}")
        for r in p["rows"]:
            mem = r.get("peak_gpu_mb", r.get("peak_rss_mb"))
            lines.append(
                f"    {r['backend']:<9}{r['precision']:<10}{r['device']:<8}{r['batch']:>5}{r['median_ms']:>11.1f}{r['p10_ms']:>9.1f}"
                f"{r['p90_ms']:>9.1f}{r['ms_per_patch']:>10.1f}{r['achieved_gflops']:>9.1f}{mem:>12.0f}"
            )
        if p["rows"]:
            r0 = p["rows"][0]
            frac = r0["fraction_of_peak"]
            lines.append(f"    fraction of the device's peak: {frac if isinstance(frac, str) else f'{frac:.1%}'}")
        for m in p["unavailable"]:
            lines.append(f"    not run: {m['backend']} {m['precision']}{' batch ' + str(m['batch']) if 'batch' in m else ''}: {m['reason']}")
    e = record.get("end_to_end")
    if e:
        lines.append("")
        if "skipped" in e:
            lines.append(f"(b) end to end: skipped, {e['skipped']}")
        else:
            lines.append(f"(b) end to end, load -> write, median of {e['repeats']} alternating runs after {e['warmup']} warm-up")
            lines.append(f"    baseline: {e['baseline']['what']} (ROI {e['baseline']['roi']}, overlap {e['baseline']['overlap']}, {e['baseline']['precision']})")
            lines.append(f"    default:  {e['default']['backend']}, window {e['default']['window']}, preprocess {e['default']['preprocess']}, lcc {e['default']['lcc']}")
            lcc = e["default"]["lcc"]
            lines.append(
                f"    {'case':<22}{'shape':<14}{'window':<9}{'baseline s':>11}{'default s':>11}{'speedup':>9}{'Dice':>8}{'(voxels)':>10}"
                f"{'Dice raw':>10}{'RSS MB b/d':>13}"
            )
            plan_names = {"whole": "one", "sliding": "sliding"}
            for c in e["cases"]:
                b, d = c["baseline"], c["default"]
                rss = f"{b['memory'].get('peak_rss_mb', 0):.0f}/{d['memory'].get('peak_rss_mb', 0):.0f}"
                lines.append(
                    f"    {c['name']:<22}{'x'.join(map(str, c['shape'])):<14}{plan_names.get(c.get('window_plan'), '-'):<9}{b['median_s']:>11.2f}"
                    f"{d['median_s']:>11.2f}{c['speedup']:>8.2f}x{c['dice_agreement']:>8.4f}{c['differing_voxels']:>10}"
                    f"{c['dice_agreement_raw']:>10.4f}{rss:>13}"
                )
            lines.append(
                "    Dice: the two masks" + (" with one component kept on both (the largest of the tutorial's, the predictor's choice of ours)" if lcc else "") + "; "
                "Dice raw: against the tutorial's own output"
            )
            lines.append(f"    speedup: min {e['speedup_min']:.2f}x, geometric mean {e['speedup_geomean']:.2f}x; Dice agreement min {e['dice_agreement_min']:.4f}")
            if stage_rows(record):
                lines.append("    seconds per stage (medians):")
                lines += _text_table(stage_rows(record), "      ")
            if agreement_rows(record):
                lines.append(f"    agreement with the tutorial's fp32 masks, per backend and precision (target: Dice >= {e.get('agreement_target')} on every case):")
                lines += _text_table(agreement_rows(record), "      ")
                for m in e.get("agreement_not_run", []):
                    lines.append(f"      not run: {m['pipeline']}: {m['reason']}")
            if process_rows(record):
                w = e["whole_process"]
                lines.append(f"    whole processes on {w['image']}, start-up included (median of {w['repeats']} alternating rounds after {w['warmup']}):")
                lines += _text_table(process_rows(record), "      ")
    return "\n".join(lines)


def report_markdown(record: dict[str, Any]) -> str:
    """The record as Markdown (what notebook 08 shows): a few sentences and two tables that wrap in a page."""
    from ..viz import markdown_table

    hw = record.get("hardware", {})
    where = f"{hw.get('cpu')} ({hw.get('cpu_cores')} cores, torch threads {hw.get('torch_threads')}, native bf16: " \
            f"{'yes' if hw.get('cpu_bf16_native') else 'no'})" + (f", GPU {hw['gpu']}" if hw.get("gpu") else ", no GPU")
    parts = [f"Measured on {where}, {record.get('date')}."]
    if hw.get("load_average_1min") is not None:
        parts[0] += (f" Load average (1 min) {hw['load_average_1min']} at the start and {record.get('load_average_1min_end')} "
                     "at the end: other processes share these CPUs, so compare numbers side by side only.")
    p = record.get("patch")
    if p:
        mm = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in p["matmul_gflops"].items() if v)
        parts.append(f"**(a) One {'×'.join(map(str, p['patch']))} patch**: {p['gflops_per_patch']:.1f} GFLOP per patch; "
                     f"a 2048² matrix product here runs at {mm}.")
        rows = [{"backend": r["backend"], "precision": r["precision"], "device": r["device"], "batch": r["batch"],
                 "median ms": r["median_ms"], "p10 ms": r["p10_ms"], "p90 ms": r["p90_ms"], "ms per patch": r["ms_per_patch"],
                 "GFLOP/s": r["achieved_gflops"], "peak MB": float(r.get("peak_gpu_mb", r.get("peak_rss_mb")) or 0)}
                for r in p["rows"]]
        parts.append(markdown_table(rows, floatfmt=".1f"))
        if p["unavailable"]:
            parts.append("Not run here: " + "; ".join(
                f"{m['backend']} {m['precision']}{' batch ' + str(m['batch']) if 'batch' in m else ''} ({m['reason']})"
                for m in p["unavailable"]) + ".")
    e = record.get("end_to_end")
    if e and "skipped" in e:
        parts.append(f"**(b) End to end**: skipped, {e['skipped']}.")
    elif e:
        parts.append(f"**(b) End to end**, file to file, median of {e['repeats']} alternating runs after {e['warmup']} "
                     f"warm-up. Baseline: {e['baseline']['what']} (ROI {e['baseline']['roi']}, overlap "
                     f"{e['baseline']['overlap']}, {e['baseline']['precision']}). Default: {e['default']['backend']}, window "
                     f"{e['default']['window']}, preprocessing {e['default']['preprocess']}.")
        plan_names = {"whole": "one", "sliding": "sliding"}
        rows = [{"case": c["name"], "shape": "×".join(map(str, c["shape"])), "window": plan_names.get(c.get("window_plan"), "-"),
                 "baseline s": c["baseline"]["median_s"], "default s": c["default"]["median_s"], "speed-up": c["speedup"],
                 "Dice agreement": c["dice_agreement"], "voxels differing": c["differing_voxels"]} for c in e["cases"]]
        parts.append(markdown_table(rows, floatfmt=".3g"))
        parts.append(f"Speed-up: at least {e['speedup_min']:.2f}×, geometric mean {e['speedup_geomean']:.2f}×; "
                     f"the two masks agree at Dice {e['dice_agreement_min']:.4f} or more"
                     + (" (one component kept on both: the largest of the tutorial's mask, the predictor's choice of its own)." if e["default"]["lcc"] else "."))
        if stage_rows(record):
            parts.append("**Where the time goes**: median seconds per stage, the same five stages for both pipelines "
                         "(read: file to array; preprocess: to the model's grid; network; invert: back to the scan's grid, "
                         "argmax and one component kept; write: the mask file).")
            parts.append(markdown_table(stage_rows(record), floatfmt=".3g"))
        if agreement_rows(record):
            parts.append(f"**Agreement per backend and precision**: Dice of each pipeline's mask with the tutorial's fp32 "
                         f"mask, per case (target {e.get('agreement_target')} on every case), and its speed-up.")
            parts.append(markdown_table(agreement_rows(record), floatfmt=".4g"))
            if e.get("agreement_not_run"):
                parts.append("Not run here: " + "; ".join(f"{m['pipeline']} ({m['reason']})" for m in e["agreement_not_run"]) + ".")
        if process_rows(record):
            w = e["whole_process"]
            parts.append(f"**Whole processes** on `{w['image']}`, start-up included (imports, opening the model): median of "
                         f"{w['repeats']} alternating rounds after {w['warmup']}. Start-up is the process's time beyond the same "
                         "work in a warm process (the end-to-end table above).")
            parts.append(markdown_table(process_rows(record), floatfmt=".3g"))
    return "\n\n".join(parts)


#: issue 14's targets on a full-resolution CT: the default path against the tutorial's pipeline
TARGETS = {"beyond start-up": 8.0, "whole process": 3.0}


def targets_markdown(record: dict[str, Any]) -> str:
    """Whether the record meets :data:`TARGETS` and :data:`AGREEMENT_TARGET`, in sentences with
    the measured numbers (met or not: a target missed is said so)."""
    e = record.get("end_to_end", {})
    out = []
    for a in e.get("agreement", []):
        worst = min(a["dice_by_case"], key=a["dice_by_case"].get) if a["dice_by_case"] else None
        out.append(f"- Agreement, {a['pipeline']} ({a['backend']}): lowest Dice {a['dice_min']:.4f} ({worst}) "
                   f"against the target {e['agreement_target']} on every case: **{'met' if a['meets_target'] else 'not met'}**.")
    w = e.get("whole_process")
    if w:
        shape = next((c["shape"] for c in e.get("cases", []) if c["file"] == w["image"]), None)
        where = f"`{w['image']}`" + (f" ({'×'.join(map(str, shape))} voxels)" if shape else "")
        for k in [k for k in w["speedup"] if k in w.get("speedup_beyond_startup", {})]:
            b, p = w["speedup_beyond_startup"][k], w["speedup"][k]
            out.append(f"- Speed, {k} on {where}: {b:.2f}× beyond start-up (target {TARGETS['beyond start-up']:g}×: "
                       f"**{'met' if b >= TARGETS['beyond start-up'] else 'not met'}**) and {p:.2f}× as whole processes "
                       f"(target {TARGETS['whole process']:g}×: **{'met' if p >= TARGETS['whole process'] else 'not met'}**); "
                       f"start-up {w['startup_s'][k]:.1f} s against the baseline's {w['startup_s']['baseline']:.1f} s.")
        case = next((c for c in e.get("cases", []) if c["file"] == w["image"]), None)
        net = (case or {}).get("stages_s", {}).get("default", {}).get("network")
        if net and "in_process_s" in w:
            base = w["in_process_s"]["baseline"]
            out.append(f"- Where the limit lies: the default path's network stage alone (the tutorial's windows, fp32) took {net:.2f} s "
                       f"of its {w['in_process_s']['default']:.2f} s; with every other stage at zero the ratio beyond start-up "
                       f"would be {base / net:.1f}×: more needs the network itself faster, on other hardware (a GPU) or "
                       f"with a lower precision or fewer windows, which change the masks.")
    return "\n".join(out) if out else "No end-to-end measurement in this record."


def plot_benchmark(record: dict[str, Any]):
    """A matplotlib figure: per-patch latency by backend and batch, end-to-end times, time per
    stage and, when measured, whole processes split into start-up and work."""
    import matplotlib.pyplot as plt

    has_e2e = bool(record.get("end_to_end", {}).get("cases"))
    has_stages = bool(stage_rows(record))
    whole = record.get("end_to_end", {}).get("whole_process") or {}
    has_whole = bool(whole.get("startup_s"))
    n = 1 + int(has_e2e) + int(has_stages) + int(has_whole)
    cols = min(n, 2)  # two panels a row: four in one row are too small to read in a book page
    rows_ = math.ceil(n / cols)
    fig, grid = plt.subplots(rows_, cols, figsize=(6.5 * cols, 4.4 * rows_), squeeze=False)
    panels = list(grid.ravel())
    for extra in panels[n:]:
        extra.remove()
    ax = panels[0]
    rows = record.get("patch", {}).get("rows", [])
    labels = list(dict.fromkeys((r["backend"], r["precision"], r["device"]) for r in rows))  # first-seen order
    batches = sorted({r["batch"] for r in rows})
    width = 0.8 / max(1, len(labels))
    for i, key in enumerate(labels):
        sel = {r["batch"]: r for r in rows if (r["backend"], r["precision"], r["device"]) == key}
        xs = [j + i * width for j, b in enumerate(batches) if b in sel]
        ys = [sel[b]["ms_per_patch"] for b in batches if b in sel]
        lo = [sel[b]["ms_per_patch"] - sel[b]["p10_ms"] / b for b in batches if b in sel]
        hi = [sel[b]["p90_ms"] / b - sel[b]["ms_per_patch"] for b in batches if b in sel]
        ax.bar(xs, ys, width, yerr=[np.maximum(lo, 0), np.maximum(hi, 0)], capsize=2, label=f"{key[0]} {key[1]} ({key[2]})")
    ax.set_xticks([j + width * (len(labels) - 1) / 2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    patch = record.get("patch", {}).get("patch", [96, 96, 96])
    ax.set_ylabel("ms per patch (median, p10-p90)")
    ax.set_title(f"one {'x'.join(map(str, patch))} patch")
    ax.legend(fontsize=8)
    if has_e2e:
        ax = panels[1]
        cases = record["end_to_end"]["cases"]
        xs = np.arange(len(cases))
        b = [c["baseline"]["median_s"] for c in cases]
        d = [c["default"]["median_s"] for c in cases]
        ax.bar(xs - 0.2, b, 0.4, label="MONAI tutorial pipeline (fp32, 160^3 sliding window)")
        ax.bar(xs + 0.2, d, 0.4, label=f"spleen_utils default ({record['end_to_end']['default']['backend']})")
        for x, c, top in zip(xs, cases, b):
            ax.text(x, top, f"{c['speedup']:.1f}x faster\nDice {c['dice_agreement']:.3f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(xs, [f"{c['name']}\n{'x'.join(map(str, c['shape']))}" for c in cases], fontsize=8)
        ax.set_ylabel("seconds, file to file (median)")
        ax.set_title("end to end, whole CT")
        ax.set_ylim(0, max(b) * 1.3)
        ax.legend(fontsize=8, loc="upper right")
    if has_stages:
        ax = panels[1 + int(has_e2e)]
        rows = stage_rows(record)
        ys = np.arange(len(rows))
        left = np.zeros(len(rows))
        for k in STAGES:
            v = np.array([r[k] for r in rows])
            ax.barh(ys, v, left=left, label=k)
            left += v
        ax.set_yticks(ys, [f"{r['case']}\n{r['pipeline']}" for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("seconds (median per stage)")
        ax.set_title("where the time goes")
        ax.legend(fontsize=7, loc="lower right")
    if has_whole:
        ax = panels[n - 1]
        names = [k for k in whole["processes"] if k in whole["startup_s"]]
        ys = np.arange(len(names))
        work = np.array([whole["in_process_s"][k] for k in names])
        start = np.array([whole["processes"][k]["median_s"] for k in names]) - work
        ax.barh(ys, start, color="0.7", label="start-up (imports, opening the model)")
        ax.barh(ys, work, left=start, color="C2", label="the prediction itself")
        for y, k, total in zip(ys, names, start + work):
            note = "" if k == "baseline" else f"  {whole['speedup'][k]:.1f}x faster"
            ax.text(total, y, f" {total:.1f} s{note}", va="center", fontsize=8)
        ax.set_yticks(ys, names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, max(start + work) * 1.45)
        ax.set_xlabel("seconds per process (median)")
        ax.set_title(f"whole processes, {whole['image'].split('.')[0]}")
        ax.legend(fontsize=7, loc="lower right")
    hw = record.get("hardware", {})
    where = hw.get("gpu") or f"{hw.get('cpu')}, {hw.get('cpu_cores')} cores"
    threads = record.get("settings", {}).get("torch_threads", hw.get("torch_threads"))
    fig.suptitle(f"spleen UNet inference on {where}, {threads} PyTorch thread(s) ({record.get('date', '')[:10]})", fontsize=10)
    fig.tight_layout()
    return fig
