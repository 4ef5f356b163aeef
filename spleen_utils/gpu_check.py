"""``spleen-seg gpu-check``: the one prepared measurement for a GPU machine (issue 11).

GPU time here comes in minutes, on a machine with PyTorch + CUDA (and Triton, CuPy, SciPy) but
no MONAI, no nibabel and no network. ``make gpu-wheels`` (on a machine with network) downloads
the two missing pure-Python wheels and builds the project's own into ``gpu_wheels/`` (about
10 MB); ``make gpu-check`` (``scripts/gpu_check.sh``) on the GPU machine installs them from that
folder without the network and runs this command, which measures, in this order:

1. **training**: the ``full`` profile at the recipe's resolution (1.5 x 1.5 x 2 mm, 96^3 crops,
   160^3 sliding-window validation) on generated volumes of MSD's size (512 x 512 x 90 at
   0.79 x 0.79 x 5 mm): 2 epochs with AMP (seconds per epoch, peak GPU memory), then
   ``--resume`` on the same device for a third epoch;
2. **per 96^3 patch** latency of the recipe's network: fp32, fp16, bf16, channels-last,
   ``torch.compile`` and CUDA graphs, at batch 1 and 4, against the 1 ms goal;
3. **end to end** on a real CT shipped with the package (``msd_spleen_8``): the default
   predictor (preprocessing on the GPU, mixed precision) against the MONAI tutorial's pipeline
   (fp32) on the same GPU, with their mask agreement (Dice, goal >= 0.999).

Each part writes a JSON record labelled with the device, driver, CUDA, cuDNN, torch and MONAI
versions and the date: into ``book/records/`` on a GPU, into a temporary folder otherwise.
``--device cpu --smoke`` runs every step at toy sizes in well under a minute (``make test``
does, so the script cannot rot); its numbers mean nothing and never go to ``book/records``.
Nothing here invents a number: a variant that cannot run on this machine is recorded as skipped,
with the reason, and one that fails as failed, with the error.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from .errors import SpleenError
from .runs import RunDir

# numpy and torch are imported where they are used: `spleen-seg --help` imports this module

RECORD_FORMAT = "spleen_utils.gpu_check/1"
#: the per-patch goal of issue 11 (the MONAI bundle's TensorRT fp16 on an A100: 1.96 ms)
PATCH_GOAL_MS = 1.0
#: the end-to-end goal: the default path's mask against the tutorial's fp32 one
AGREEMENT_GOAL = 0.999
#: a volume of MSD Task09's typical size and spacing (x, y, z)
MSD_SHAPE, MSD_SPACING = (512, 512, 90), (0.79, 0.79, 5.0)
PARTS = ("train", "patch", "e2e")


# ---------------------------------------------------------------------------------- provenance
def _driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def provenance(device: torch.device, smoke: bool) -> dict[str, Any]:
    """Where and when: device, driver, CUDA, cuDNN, torch, MONAI, Python, date (UTC)."""
    import os

    import torch

    from .provenance import cpu_name, utc_now, versions

    cuda = device.type == "cuda"
    info: dict[str, Any] = {
        "date": utc_now(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_name(),
        "gpu_visible": torch.cuda.is_available(),
        "driver": _driver_version() if cuda else None,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "torch": str(torch.__version__),  # the running one, whether or not pip installed it
        **versions(("monai", "spleen_utils", "python")),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_name(),
        "smoke": bool(smoke),
    }
    if cuda:
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["compute_capability"] = f"{props.major}.{props.minor}"
    return info


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:40] or "device"


def write_record(records: Path, part: str, prov: dict[str, Any], result: dict[str, Any]) -> Path:
    records.mkdir(parents=True, exist_ok=True)
    stamp = prov["date"][:19].replace(":", "").replace("-", "")
    path = records / f"gpu-check_{_slug(prov['device_name'])}_{stamp}_{part}.json"
    from .provenance import write_json

    return write_json({"format": RECORD_FORMAT, "part": part, "provenance": prov, **result}, path)


# ---------------------------------------------------------------------------------- data
def write_msd_like(root: Path, n_cases: int, shape=MSD_SHAPE, spacing=MSD_SPACING, seed: int = 0) -> Path:
    """``n_cases`` CT volumes of MSD's size in the MSD layout, from NumPy alone (seconds, not minutes).

    A body (soft tissue around fat), a spine, a liver on the patient's right and a spleen on the
    left, in HU with noise: enough for the pipeline's every stage to do its real amount of work.
    Their labels are the spleen. These measure speed and memory, not accuracy.
    """
    import numpy as np

    from .io import save_nifti

    rng = np.random.default_rng(seed)
    sx, sy, sz = spacing
    x, y, z = np.meshgrid(*(np.arange(n, dtype=np.float32) - n / 2 for n in shape), indexing="ij")
    x, y, z = x * sx, y * sy, z * sz  # mm from the centre
    items = []
    for i in range(1, n_cases + 1):
        body = (x / (170 + 10 * rng.uniform())) ** 2 + (y / (120 + 10 * rng.uniform())) ** 2 < 1
        hu = np.where(body, -90.0, -1000.0).astype(np.float32)
        hu[body & ((x / 160) ** 2 + (y / 110) ** 2 < 1)] = 40.0
        hu[(x ** 2 + (y - 60) ** 2) < 18 ** 2] = 400.0  # spine
        liver = ((x + 70) / 80) ** 2 + (y / 70) ** 2 + (z / 90) ** 2 < 1
        hu[liver] = 60.0
        c = rng.uniform(-8, 8, 3)
        spleen = ((x - 80 - c[0]) / 45) ** 2 + ((y - 10 - c[1]) / 30) ** 2 + ((z - c[2]) / 55) ** 2 < 1
        hu[spleen] = 50.0
        hu += rng.normal(0, 12, shape).astype(np.float32)
        affine = np.diag([-sx, -sy, sz, 1.0])  # LPS-like, as MSD's headers
        save_nifti(hu.astype(np.int16), affine, root / "imagesTr" / f"spleen_{i}.nii.gz")
        save_nifti(spleen.astype(np.uint8), affine, root / "labelsTr" / f"spleen_{i}.nii.gz")
        items.append({"image": f"./imagesTr/spleen_{i}.nii.gz", "label": f"./labelsTr/spleen_{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"name": root.name, "training": items, "test": []}))
    return root


SMOKE_RECIPE = dict(pixdim=(4.0, 4.0, 4.0), patch_size=(32, 32, 32), sw_roi=(64, 64, 64), num_samples=2,
                    channels=(8, 16, 32, 64, 128))


# ---------------------------------------------------------------------------------- 1. training
def check_training(work: Path, device: torch.device, smoke: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """Full profile, 2 epochs with AMP, then ``--resume`` for a third: seconds per epoch, peak memory."""
    import torch

    from .config import get_config
    from .train import train

    n_cases = 3 if smoke else 5
    shape, spacing = ((96, 96, 24), (3.0, 3.0, 6.0)) if smoke else (MSD_SHAPE, MSD_SPACING)
    t0 = time.perf_counter()
    data = write_msd_like(work / "MSDLike", n_cases, shape, spacing)
    gen_s = time.perf_counter() - t0
    say(f"train: {n_cases} generated volumes of {shape} at {spacing} mm in {gen_s:.0f} s")
    over: dict[str, Any] = dict(data_root=data.parent, dataset=data.name, out_dir=work / "run", val_cases=1, val_interval=1,
                                device=str(device), amp=True, real_train=(), real_val=(), appearance_prob=0.0)
    if smoke:
        over.update(SMOKE_RECIPE, batch_size=1, num_workers=0, val_interval=2)  # validated at epochs 2 and 3
    cfg2 = get_config("full", **over, epochs=2)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    first = train(cfg2, progress=False)
    first_s = time.perf_counter() - t0
    peak = _peak_gpu(device)
    rows = _rows(cfg2.out_dir)
    per_epoch = ", ".join(f"{r['seconds']:.1f}" for r in rows)
    say(f"train: 2 epochs in {first_s:.0f} s ({per_epoch} s per epoch)")
    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    second = train(get_config("full", **over, epochs=3), resume=True, progress=False)
    resume_s = time.perf_counter() - t0
    rows = _rows(cfg2.out_dir)
    ok = [r["epoch"] for r in rows] == [1, 2, 3] and second["epochs"] == 3
    say(f"train: --resume to epoch 3 {'worked' if ok else 'FAILED'} in {resume_s:.0f} s")
    r = cfg2.recipe
    return {
        "what": "full profile on generated volumes of MSD's size: 2 epochs with AMP, then --resume for a third",
        "profile": "full" + (" (smoke: toy recipe)" if smoke else ""),
        "recipe": {"pixdim": list(r.pixdim), "patch_size": list(r.patch_size), "num_samples": r.num_samples,
                   "sw_roi": list(r.sw_roi), "channels": list(r.channels)},
        "batch_size": cfg2.batch_size,
        "volumes": {"n_train": first["n_train"], "n_val": first["n_val"], "shape": list(shape), "spacing_mm": list(spacing),
                    "generate_s": round(gen_s, 2)},
        "precision": first["precision"],
        "seconds_per_epoch": [round(x["seconds"], 3) for x in rows],
        "first_two_epochs_wall_s": round(first_s, 2),
        "peak_gpu_memory_mib": peak,
        "resume": {"ok": ok, "epochs": [x["epoch"] for x in rows], "wall_s": round(resume_s, 2),
                   "peak_gpu_memory_mib": _peak_gpu(device), "device": str(device)},
        "losses": [x["loss"] for x in rows],
        "val_dice": [x["val_dice"] for x in rows],
        "note": "generated volumes: the Dice says nothing about accuracy; the times include caching only in the wall times",
    }


def _rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _peak_gpu(device: torch.device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


# ---------------------------------------------------------------------------------- 2. patches
def _variants(device: torch.device, smoke: bool) -> list[tuple[str, str | None]]:
    """(name, reason it is skipped here or None)."""
    cuda = device.type == "cuda"
    return [
        ("fp32", None),
        ("fp16", None if cuda else "fp16 convolutions are a GPU variant (no fast CPU kernels)"),
        ("bf16", None),
        ("channels_last", None),
        ("torch_compile", None if cuda else "inductor's compile takes minutes on a CPU; a GPU measurement"),
        ("cuda_graphs", None if cuda else "needs CUDA"),
    ]


def _runner(name: str, net: torch.nn.Module, x: torch.Tensor, device: torch.device) -> tuple[Callable[[], Any], float]:
    """A no-argument call of one variant and the seconds its set-up took (compile, capture)."""
    import torch

    cuda = device.type == "cuda"
    half = torch.float16 if cuda else torch.bfloat16
    t0 = time.perf_counter()
    if name == "fp32":
        fn = lambda: net(x)  # noqa: E731
    elif name in ("fp16", "bf16"):
        dtype = torch.float16 if name == "fp16" else torch.bfloat16
        def fn():
            with torch.autocast(device.type, dtype=dtype):
                return net(x)
    elif name == "channels_last":
        # the fastest eager layout: channels-last 3-D, in the device's mixed precision
        cl = net.to(memory_format=torch.channels_last_3d)
        xc = x.contiguous(memory_format=torch.channels_last_3d)
        def fn():
            with torch.autocast(device.type, dtype=half):
                return cl(xc)
    elif name == "torch_compile":
        cl = net.to(memory_format=torch.channels_last_3d)
        xc = x.contiguous(memory_format=torch.channels_last_3d)
        compiled = torch.compile(cl, dynamic=False)  # one static shape per batch size
        def fn():
            with torch.autocast(device.type, dtype=half):
                return compiled(xc)
        fn()  # compiles here (counted as set-up)
        _sync(device)
    elif name == "cuda_graphs":
        # weights and input in fp16, channels-last; one captured forward replayed
        import copy

        g_net = copy.deepcopy(net).half().to(memory_format=torch.channels_last_3d)
        static = x.half().contiguous(memory_format=torch.channels_last_3d)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                g_net(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            g_out = g_net(static)  # noqa: F841 (kept alive by the graph)
        fn = graph.replay
    else:
        raise ValueError(name)
    return fn, time.perf_counter() - t0


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> list[float]:
    from .bench import time_calls

    return time_calls(fn, repeats=repeats, warmup=warmup, device=device)


def check_patches(device: torch.device, smoke: bool, say: Callable[[str], None]) -> dict[str, Any]:
    """Latency of the recipe's network on one 96^3 patch (toy net, 16^3 in a smoke run)."""
    import numpy as np
    import torch

    from .config import Recipe
    from .model import build_network

    recipe = Recipe(**({"channels": SMOKE_RECIPE["channels"]} if smoke else {}))
    patch = (16, 16, 16) if smoke else (96, 96, 96)
    repeats, warmup = (1, 1) if smoke else (30, 10)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    rows = []
    for batch in (1, 4):
        for name, skip in _variants(device, smoke):
            row: dict[str, Any] = {"variant": name, "batch": batch}
            if skip:
                rows.append({**row, "status": "skipped", "reason": skip})
                continue
            torch.manual_seed(0)
            net = build_network(recipe).to(device).eval()
            x = torch.rand(batch, 1, *patch, device=device)
            try:
                with torch.no_grad():  # not inference_mode: its tensors do not mix with compile and graph capture
                    fn, setup_s = _runner(name, net, x, device)
                    times = _time(fn, repeats, warmup, device)
            except Exception as e:  # a variant this machine cannot run is recorded, not hidden
                rows.append({**row, "status": "failed", "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"})
                say(f"patch: {name} batch {batch} failed ({type(e).__name__})")
                continue
            finally:
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            med = float(np.median(times))
            row.update(status="ok", setup_s=round(setup_s, 3), median_ms=round(med * 1e3, 4), min_ms=round(min(times) * 1e3, 4),
                       ms_per_patch=round(med * 1e3 / batch, 4), repeats=repeats, warmup=warmup)
            row["meets_goal"] = row["ms_per_patch"] <= PATCH_GOAL_MS
            rows.append(row)
            say(f"patch: {name:<14} batch {batch}: {row['ms_per_patch']:.3f} ms per patch")
    ok = [r for r in rows if r["status"] == "ok"]
    best = min(ok, key=lambda r: r["ms_per_patch"]) if ok else None
    return {
        "what": f"forward pass of the recipe's UNet on {'x'.join(map(str, patch))} patches, median over {repeats} timed calls",
        "network": {"channels": list(recipe.channels), "strides": list(recipe.strides), "num_res_units": recipe.num_res_units},
        "patch": list(patch),
        "goal_ms_per_patch": PATCH_GOAL_MS,
        "reference": "MONAI spleen bundle on an A100: TensorRT fp16 1.96 ms, PyTorch fp32 6.46 ms per 96^3 patch",
        "rows": rows,
        "best": {k: best[k] for k in ("variant", "batch", "ms_per_patch", "meets_goal")} if best else None,
    }


# ---------------------------------------------------------------------------------- 3. end to end
def check_end_to_end(model_path: Path, device: torch.device, smoke: bool, work: Path, say: Callable[[str], None],
                     case: str = "msd_spleen_8") -> dict[str, Any]:
    """A shipped real CT: the default predictor against the tutorial's pipeline on the same device."""
    from .bench import bench_end_to_end
    from .infer import Predictor
    from .io import load_nifti
    from .metrics import dice
    from .samples import real_case

    real = real_case(case)
    predictor = Predictor.from_path(model_path, backend="torch", device=str(device), precision="auto")
    repeats, warmup = (1, 0) if smoke else (3, 1)
    res = bench_end_to_end(model_path, [real.image], device=str(device), repeats=repeats, warmup=warmup, predictor=predictor,
                           out_dir=work / "e2e")
    mask_path = work / "e2e_mask.nii.gz"
    predictor.predict_file(real.image, mask_path)
    truth = load_nifti(real.label, what="label").array > 0
    res["dice_vs_label"] = float(dice(load_nifti(mask_path).array > 0, truth))
    res["case"] = case
    res["model"] = {"path": str(model_path), "training_data": predictor.backend.meta.get("training_data") if hasattr(predictor.backend, "meta") else None}
    agree = res.get("dice_agreement_min")
    res["meets_agreement_goal"] = agree is not None and agree >= AGREEMENT_GOAL
    res["agreement_goal"] = AGREEMENT_GOAL
    c = res["cases"][0] if res.get("cases") else {}
    say(f"e2e: {case}: tutorial {c.get('baseline', {}).get('median_s', float('nan')):.2f} s, default "
        f"{c.get('default', {}).get('median_s', float('nan')):.2f} s, agreement Dice {agree}, Dice vs label {res['dice_vs_label']:.3f}")
    return res


# ---------------------------------------------------------------------------------- the command
def default_records(device: torch.device, smoke: bool) -> Path:
    from .config import PROJECT_ROOT

    if device.type == "cuda" and not smoke:
        return PROJECT_ROOT / "book" / "records"
    return Path(tempfile.mkdtemp(prefix="spleen-gpu-check-"))


def _in_book_records(path: Path) -> bool:
    parts = path.resolve().parts
    return any(parts[i:i + 2] == ("book", "records") for i in range(len(parts) - 1))


def run_gpu_check(device: str = "cuda", smoke: bool = False, records: str | Path | None = None, work: str | Path | None = None,
                  model: str | Path | None = None, parts: tuple[str, ...] = PARTS,
                  say: Callable[[str], None] = lambda s: print(s, flush=True)) -> dict[str, Any]:
    """Run the check; returns ``{"records": [paths], "results": {part: record}, "failed": [parts]}``."""
    import torch

    from .model import resolve_device

    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.init()
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SpleenError(f"unknown gpu-check part {unknown[0]!r}; choose from {', '.join(PARTS)}.")
    rec_dir = Path(records) if records else default_records(dev, smoke)
    if (dev.type != "cuda" or smoke) and _in_book_records(rec_dir):
        raise SpleenError("book/records holds measurements from a real GPU only; leave out --records on a CPU or in a smoke run.")
    work_dir = Path(work) if work else Path(tempfile.mkdtemp(prefix="spleen-gpu-work-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    prov = provenance(dev, smoke)
    say(f"gpu-check on {prov['device_name']} ({dev}; driver {prov['driver']}, CUDA {prov['cuda']}, torch {prov['torch']}); "
        f"records -> {rec_dir}")
    out: dict[str, Any] = {"records": [], "results": {}, "failed": [], "records_dir": str(rec_dir)}
    trained: Path | None = None
    for part in parts:
        t0 = time.perf_counter()
        try:
            if part == "train":
                result = check_training(work_dir, dev, smoke, say)
                trained = RunDir(work_dir / "run").best_model
            elif part == "patch":
                result = check_patches(dev, smoke, say)
            else:
                model_path = Path(model) if model else trained
                if model_path is None or not model_path.exists():
                    raise SpleenError("the end-to-end part needs a model: pass --model (e.g. outputs/runs/quick/best_model.pt) or run the train part first.")
                # a smoke run takes the small real scan (3 mm, 122 x 101 x 112) to stay in seconds
                result = check_end_to_end(model_path, dev, smoke, work_dir, say, case="totalseg_ct_3mm" if smoke else "msd_spleen_8")
        except SpleenError:
            raise
        except Exception as e:  # one part failing still leaves the others' records
            out["failed"].append(part)
            result = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:1000]}
            say(f"{part}: FAILED ({type(e).__name__}: {str(e)[:200]})")
        result["part_wall_s"] = round(time.perf_counter() - t0, 2)
        out["results"][part] = result
        out["records"].append(str(write_record(rec_dir, part, prov, result)))
    return out


# ---------------------------------------------------------------------------------- the book
def book_records(folder: str | Path | None = None) -> list[dict[str, Any]]:
    """The GPU records committed under ``book/records/`` (newest first); smoke or CPU records are never there."""
    from .config import PROJECT_ROOT

    folder = Path(folder or PROJECT_ROOT / "book" / "records")
    out = []
    for p in sorted(folder.glob("gpu-check_*.json")):
        try:
            rec = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if rec.get("format") == RECORD_FORMAT and not rec.get("provenance", {}).get("smoke"):
            rec["file"] = p.name
            out.append(rec)
    return sorted(out, key=lambda r: r["provenance"].get("date", ""), reverse=True)


def patch_markdown(records: list[dict[str, Any]]) -> str:
    """Per-patch latency rows of the newest GPU ``patches`` record, labelled with device and date (Markdown)."""
    rec = next((r for r in records if r.get("part") == "patches"), None)
    if rec is None:
        return ""
    prov = rec["provenance"]
    lines = [f"Measured by `spleen-seg gpu-check` on {prov.get('device_name')} (driver {prov.get('driver')}, CUDA "
             f"{prov.get('cuda')}, torch {prov.get('torch')}), {prov.get('date')}; {rec.get('what', '')}. "
             f"Goal: {rec.get('goal_ms_per_patch')} ms per patch; {rec.get('reference', '')}.", "",
             "| variant | batch | ms per patch | meets goal |", "|---|---|---|---|"]
    for r in rec.get("rows", []):
        if r.get("status") == "ok":
            lines.append(f"| {r['variant']} | {r['batch']} | {r['ms_per_patch']:.3f} | {'yes' if r.get('meets_goal') else 'no'} |")
        else:
            lines.append(f"| {r['variant']} | {r['batch']} | {r.get('status')}: {r.get('reason') or r.get('error', '')} | |")
    return "\n".join(lines)
