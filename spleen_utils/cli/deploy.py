"""Deployment commands of ``spleen-seg``: export-onnx, build-trt, compare-backends, bench.

Thin callers of library functions (:mod:`~spleen_utils.export`, :mod:`~spleen_utils.compare`,
:mod:`~spleen_utils.bench`); errors a user can fix raise :class:`~spleen_utils.errors.SpleenError`,
which ``spleen-seg`` prints as one sentence (exit 2). Imports stay inside the commands:
``spleen-seg --help`` must stay fast.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .args import positive_csv_ints, positive_int, progress_printer


# ---------------------------------------------------------------- export-onnx
def cmd_export_onnx(a: argparse.Namespace) -> int:
    from ..export import DEFAULT_OPSET, export_onnx

    opset = DEFAULT_OPSET if a.opset is None else a.opset
    rep = export_onnx(a.model, a.out, opset=opset, validate=not a.no_validate, real_image=a.real_image, exporter=a.exporter)
    print(f"wrote {rep['path']} ({rep['size_bytes'] / 2**20:.1f} MiB, opset {rep['opset']}, {rep['exporter']} exporter, onnx.checker ok)")
    if rep["validated"]:
        print(f"validation, max |ONNX Runtime - PyTorch| of the logits (tolerance {rep['tolerance']:g}):")
        for name, d in rep["max_abs_diff"].items():
            print(f"  {name:<40} {d:.3g}")
    else:
        print("not validated (--no-validate)")
    print(f"export {rep['export_seconds']:.1f} s, validation {rep['validate_seconds']:.1f} s")
    if a.json:
        from ..provenance import write_json

        write_json(rep, a.json)
        print(f"written: {a.json}")
    return 0


# ---------------------------------------------------------------- build-trt
def cmd_build_trt(a: argparse.Namespace) -> int:
    from ..export import build_trt_engine, engine_sidecar

    out = build_trt_engine(
        a.onnx,
        a.out,
        fp16=a.fp16,
        min_batch=a.min_batch,
        opt_batch=a.opt_batch,
        max_batch=a.max_batch,
        workspace_gb=a.workspace_gb,
    )
    print(f"wrote {out} ({'fp16' if a.fp16 else 'fp32'}) and its description {engine_sidecar(out)}")
    return 0


# ---------------------------------------------------------------- compare-backends
def cmd_compare(a: argparse.Namespace) -> int:
    from ..compare import compare_backends, format_comparison

    rec = compare_backends(
        a.model,
        onnx_path=a.onnx,
        engine_path=a.engine,
        data_dir=a.data,
        real_dir=False if a.no_real else a.real,
        device=a.device,
        profile=a.profile,
        val_cases=a.val_cases,
        window=a.window,
        lcc=not a.no_lcc,
        json_out=a.json,
        progress=progress_printer(a.quiet),
    )
    print(format_comparison(rec))
    if a.json:
        print(f"written: {a.json}")
    return 0


# ---------------------------------------------------------------- bench
def cmd_bench(a: argparse.Namespace) -> int:
    from ..bench import format_report, plot_benchmark, run_benchmark

    rec = run_benchmark(
        model_path=a.model,
        onnx_path=a.onnx,
        engine_path=a.engine,
        images=a.images,
        device=a.device,
        repeats=a.repeats,
        patch_repeats=a.patch_repeats,
        batch_sizes=a.batch_sizes,
        patches=not a.no_patch,
        end_to_end=not a.no_end_to_end,
        window=a.window,
        precision=a.precision,
        threads=a.threads,
        patch=a.patch,
        json_out=a.json,
        progress=progress_printer(a.quiet),
        processes=not a.no_processes and not a.no_end_to_end,
        process_image=a.process_image,
        process_repeats=a.process_repeats,
    )
    print(format_report(rec))
    if a.json:
        print(f"written: {a.json}")
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        fig = plot_benchmark(rec)
        Path(a.plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(a.plot, dpi=120)
        print(f"figure: {a.plot}")
    return 0


def register(sub) -> None:
    """Add ``export-onnx``, ``build-trt``, ``compare-backends`` and ``bench`` to ``spleen-seg``.

    Nothing heavy is imported here (``spleen-seg --help`` runs it): not the exporter, which
    imports torch; :mod:`spleen_utils.infer` imports only numpy.
    """
    from ..infer import PRECISIONS

    e = sub.add_parser("export-onnx", help="export a checkpoint to one self-describing ONNX file, validated against PyTorch")
    e.add_argument("--model", required=True, help="a spleen_utils checkpoint (best_model.pt)")
    e.add_argument("--out", required=True, help="the ONNX file to write (e.g. model.onnx)")
    e.add_argument("--opset", type=int, help="ONNX opset (default: spleen_utils.export.DEFAULT_OPSET, 18; below 18 the TorchScript exporter is used)")
    e.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto")
    e.add_argument("--real-image", help="a CT (NIfTI) whose central patch joins the validation inputs")
    e.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    e.add_argument("--json", help="write the export report here")
    e.set_defaults(func=cmd_export_onnx)

    t = sub.add_parser("build-trt", help="build a TensorRT 10 engine from the ONNX file (NVIDIA GPU + TensorRT only)")
    t.add_argument("--onnx", required=True, help="a spleen_utils ONNX file")
    t.add_argument("--out", required=True, help="the engine to write (e.g. model.engine; a model.engine.json description goes beside it)")
    prec = t.add_mutually_exclusive_group()
    prec.add_argument("--fp16", dest="fp16", action="store_true", default=True, help="let TensorRT use FP16 kernels (default)")
    prec.add_argument("--fp32", dest="fp16", action="store_false", help="FP32 kernels only")
    t.add_argument("--min-batch", type=positive_int, default=1)
    t.add_argument("--opt-batch", type=positive_int, default=4)
    t.add_argument("--max-batch", type=positive_int, default=8)
    t.add_argument("--workspace-gb", type=float, default=4.0)
    t.set_defaults(func=cmd_build_trt)

    c = sub.add_parser("compare-backends", help="Dice of each backend against the labels, and their agreement, on held-out cases")
    c.add_argument("--model", required=True, help="a spleen_utils checkpoint (best_model.pt)")
    c.add_argument("--onnx", help="its ONNX export (default: exported to a temporary file for the comparison)")
    c.add_argument("--engine", help="a TensorRT engine built from it (GPU only)")
    c.add_argument("--data", help="an MSD-layout dataset; its validation split is used (default: the profile's dataset, when present)")
    c.add_argument("--real", help="a folder of real CT scans with spleen masks (X_image/X_label pairs; default: the scans shipped in spleen_utils.samples)")
    c.add_argument("--no-real", action="store_true", help="leave the real CT scans out")
    c.add_argument("--profile", choices=["quick", "full"], default="quick", help="whose dataset and validation split (default: quick)")
    c.add_argument("--val-cases", type=positive_int, help="validate on the last N cases (default: the profile's)")
    c.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    c.add_argument("--window", choices=["auto", "whole", "sliding"], default="auto", help="the Predictor's window policy, the same for every backend")
    c.add_argument("--no-lcc", action="store_true", help="keep every connected component")
    c.add_argument("--json", help="write the record here")
    c.add_argument("--quiet", action="store_true", help="no progress lines")
    c.set_defaults(func=cmd_compare)

    b = sub.add_parser("bench", help="per-patch latency per backend and precision, and whole-CT time against the MONAI tutorial pipeline")
    b.add_argument("--model", help="a spleen_utils checkpoint (default: outputs/runs/quick/best_model.pt)")
    b.add_argument("--onnx", help="its ONNX export (default: exported to a temporary file for the run)")
    b.add_argument("--engine", help="a TensorRT engine built from it (GPU only)")
    b.add_argument("--images", nargs="+", help="CT files timed end to end (default: the real CT fixtures, when present)")
    b.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    b.add_argument("--repeats", type=positive_int, default=3, help="timed end-to-end runs per pipeline and image (default 3)")
    b.add_argument("--patch-repeats", type=positive_int, help="timed calls per patch measurement (default: max(repeats, 5))")
    b.add_argument("--batch-sizes", type=positive_csv_ints, default=(1, 2, 4), help="patch batch sizes (default 1,2,4)")
    b.add_argument("--patch", type=positive_csv_ints, help="patch size timed in the per-patch part (default 96,96,96)")
    b.add_argument("--threads", type=positive_int, help="PyTorch threads for the whole run, both pipelines alike (default: one per core)")
    b.add_argument("--no-patch", action="store_true", help="skip the per-patch part")
    b.add_argument("--no-end-to-end", action="store_true", help="skip the whole-CT part")
    b.add_argument("--no-processes", action="store_true", help="skip timing each pipeline as a whole process (start-up included)")
    b.add_argument("--process-image", help="the CT timed as whole processes (default: the largest of --images)")
    b.add_argument("--process-repeats", type=positive_int, help="timed rounds of whole processes (default: --repeats)")
    b.add_argument("--window", choices=["auto", "whole", "sliding"], default="auto", help="the default path's window policy (default: auto, the Predictor's)")
    b.add_argument("--precision", choices=PRECISIONS, default="auto", help="the default path's precision (default: auto, the Predictor's: fp32)")
    b.add_argument("--json", help="write the record here")
    b.add_argument("--plot", help="save the figure here (PNG, SVG, PDF)")
    b.add_argument("--quiet", action="store_true", help="no progress lines")
    b.set_defaults(func=cmd_bench)
