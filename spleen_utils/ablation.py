"""What each ingredient of the quick profile's data adds on real CT: an ablation, one command.

Four trainings of the ``quick`` profile, each adding one ingredient, with the same number of
optimizer steps (so that a smaller training set is not also a shorter training):

1. ``phantoms``: the drawn phantoms alone, no augmentation (the profile before real anatomy);
2. ``+ appearance``: the same phantoms, every patch repainted with a random CT appearance;
3. ``+ label maps``: plus CT painted on the deformed anatomy of four real people;
4. ``+ real scan``: plus one real scan (``msd_spleen_8``): the ``quick`` profile itself.

Every model is then scored on the real scans at their own resolution (the shipped ones, and
``ircad_1`` when it is on this machine: never trained on). The record (``--out``, JSON) holds
for every step the exact ``spleen-seg train`` command that reproduces it, its run's summary and
the Dice per real scan, with the date and the machine. Run: ``spleen-seg ablation``.
"""

from __future__ import annotations

import json
import math
import shlex
import time
from pathlib import Path
from typing import Any

from .config import PROJECT_ROOT, Config, get_config

#: (name, what it adds, overrides of the quick profile)
STEPS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("phantoms", "phantoms only, no augmentation", dict(train_sources=("phantom",), appearance_prob=0.0, real_train=())),
    ("+ appearance", "+ randomised CT appearance", dict(train_sources=("phantom",), real_train=())),
    ("+ label maps", "+ real anatomy (label maps)", dict(real_train=())),
    ("+ real scan", "+ one real scan (the quick profile)", {}),
)
DEFAULT_RECORD = PROJECT_ROOT / "book" / "records" / "ablation.json"


def _steps_per_epoch(cfg: Config) -> int:
    """Optimizer steps per epoch of ``cfg``, from the generated set's plan (no files needed)."""
    from .samples import label_maps
    from .synthetic import case_plan

    maps = [m.name for m in label_maps()] if cfg.labelmap_cases else []
    plan = case_plan(cfg.synthetic_cases, maps, cfg.labelmap_cases, cfg.val_per_source)
    n = sum(1 for _, source, fold in plan if fold == "training" and source.split(":", 1)[0] in cfg.train_sources)
    n += len(cfg.real_train) * max(int(cfg.real_repeats), 1)
    return math.ceil(n / cfg.batch_size)


def step_configs(root: Path | None = None) -> list[tuple[str, str, Config, list[str]]]:
    """Each step's configuration (epochs scaled to the quick profile's number of optimizer steps)
    and the command line that trains it."""
    quick = get_config("quick")
    root = Path(root) if root else PROJECT_ROOT / "outputs" / "runs" / "ablation"
    budget = quick.epochs * _steps_per_epoch(quick)
    out = []
    for k, (name, what, over) in enumerate(STEPS, start=1):
        last = k == len(STEPS)
        folder = quick.out_dir if last else root / f"{k}-{name.strip('+ ').replace(' ', '-')}"
        cfg = get_config("quick", out_dir=folder, **over)
        epochs = budget // _steps_per_epoch(cfg)
        # as many validations as the quick profile makes, whatever the epochs
        val_interval = max(1, round(quick.val_interval * epochs / quick.epochs))
        cfg = get_config("quick", out_dir=folder, epochs=epochs, val_interval=val_interval, **over)
        cmd = ["spleen-seg", "train", "--profile", "quick"]
        if not last:
            cmd += ["--out", str(Path(folder).relative_to(PROJECT_ROOT)) if Path(folder).is_relative_to(PROJECT_ROOT) else str(folder)]
        if epochs != quick.epochs:
            cmd += ["--epochs", str(epochs), "--val-interval", str(val_interval)]
        if "train_sources" in over:
            cmd += ["--train-sources", ",".join(over["train_sources"])]
        if "appearance_prob" in over:
            cmd += ["--appearance-prob", str(over["appearance_prob"])]
        if "real_train" in over:
            cmd += ["--real-train", ",".join(over["real_train"]) or "none"]
        out.append((name, what, cfg, cmd))
    return out


def run_ablation(record: Path = DEFAULT_RECORD, root: Path | None = None, progress: bool = True, log=print) -> dict[str, Any]:
    """Train (or reuse) every step, score each on the real scans, write and return the record."""
    from .evaluate import evaluate_items, predict_items, real_cases, real_role
    from .infer import Predictor
    from .provenance import hardware, utc_now, write_json
    from .runs import RunDir, prepare_dataset, train_or_reuse

    steps = step_configs(root)
    log(prepare_dataset(steps[0][2], progress=progress))
    items, why = real_cases(validation=True)
    log(why)
    rows: list[dict[str, Any]] = [{}] * len(steps)
    # the quick profile first: it is the product (and `make reproduce` reuses its run)
    order = [len(steps)] + list(range(1, len(steps)))
    for k in order:
        name, what, cfg, cmd = steps[k - 1]
        log(f"[{k}/{len(steps)}] {what}: {shlex.join(cmd)}")
        t0 = time.perf_counter()
        summary, status = train_or_reuse(cfg, progress=progress)
        log(f"  {status}")
        run = RunDir(cfg.out_dir)
        predictor = Predictor.from_path(run.best_model, backend="torch", device="cpu", precision="fp32")
        recs = predict_items(predictor, items, run.predictions / "real")
        ev = evaluate_items(recs, items, run.eval / "real.json")
        real = {c["name"]: {"dice": round(c["dice"], 4), "role": real_role(i, cfg), "label_source": i.get("label_source")}
                for c, i in zip(ev["cases"], items)}
        log("  real CT Dice: " + ", ".join(f"{n} {v['dice']:.3f}" for n, v in real.items()))
        rows[k - 1] = ({"step": name, "adds": what, "command": shlex.join(cmd), "epochs": cfg.epochs,
                     "optimizer_steps": cfg.epochs * _steps_per_epoch(cfg), "train_seconds": summary.get("train_seconds"),
                     "best_val_dice": summary.get("best_val_dice"), "best_val_dice_by_source": summary.get("best_val_dice_by_source"),
                     "real": real, "seconds": round(time.perf_counter() - t0, 1)})
    out = {"what": "quick-profile ablation: real-CT Dice as the training data gain one ingredient at a time",
           "command": "spleen-seg ablation", "date": utc_now(),
           "hardware": hardware("cpu"), "quick_profile": profile_settings(), "steps": rows}
    record = write_json(out, record)  # atomic, parent folders made
    log(f"record: {record}")
    return out


#: the quick profile's settings an ablation depends on (its commands change meaning with them)
PROFILE_KEYS = ("epochs", "synthetic_cases", "labelmap_cases", "val_per_source", "real_train", "real_repeats",
                "appearance_prob", "wild", "lr_schedule", "loss")


def profile_settings(cfg: Config | None = None) -> dict[str, Any]:
    """The settings of the ``quick`` profile (or ``cfg``) that the ablation's commands inherit."""
    from .synthetic import VERSION

    cfg = cfg or get_config("quick")
    d = cfg.to_dict()
    r = d["recipe"]
    # the generator's version too: the same settings on another generator's cases train another model
    return {**{k: d[k] for k in PROFILE_KEYS}, "patch_size": r["patch_size"], "num_samples": r["num_samples"],
            "pixdim": r["pixdim"], "learning_rate": r["learning_rate"], "generator_version": VERSION}


def stale_note(record: dict[str, Any]) -> str | None:
    """A sentence when ``record`` was measured with other quick-profile settings than today's."""
    then, now = record.get("quick_profile"), profile_settings()
    if then == now:
        return None
    if then is None:
        return ("This record predates today's quick profile (it stores no settings; it was measured with 5 cases "
                "per label map and 50 epochs): its commands now train other models, and its last row is not the "
                "model of notebook 02. `spleen-seg ablation` measures it again.")
    diff = ", ".join(f"{k} {then[k]!r} then, {now[k]!r} now" if k in then else f"{k} {now[k]!r} now, not recorded then"
                     for k in now if then.get(k) != now.get(k))
    return (f"Measured with other quick-profile settings than today's ({diff}): its commands now train other "
            "models, and its last row is not the model of notebook 02. `spleen-seg ablation` measures it again.")


def table(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows for the book: one per step, a column per real scan."""
    rows = []
    for s in record["steps"]:
        row = {"step": s["adds"], "epochs": s["epochs"], "steps": s["optimizer_steps"],
               "generated val Dice": s["best_val_dice"]}
        for name, v in s["real"].items():
            row[f"{name} Dice"] = v["dice"]
        rows.append(row)
    return rows


def markdown(path: Path = DEFAULT_RECORD) -> str:
    """The book's ablation section: the table, where and when it was measured, the commands."""
    from .viz import markdown_table

    path = Path(path)
    if not path.exists():
        return f"*The ablation has not been run here (no `{path.name}`): `spleen-seg ablation` runs it (about 30 min on 2 CPU cores, 40 without a finished quick run to reuse).*"
    record = json.loads(path.read_text())
    hw = record.get("hardware") or {}
    roles = "; ".join(f"`{n}`: {v['role']}, {v['label_source']} label" for n, v in record["steps"][-1]["real"].items())
    lines = [markdown_table(table(record), floatfmt=".3f"), "",
             f"Measured on {record['date'][:10]} on {hw.get('cpu', '?')} ({hw.get('cpu_threads', hw.get('cpu_count', '?'))} cores, CPU only) "
             f"by `{record['command']}`. The real scans, as the last row used them (the rows above train on no real "
             f"scan): {roles}. The commands, one per row:", ""]
    lines += [f"{k}. `{s['command']}`" for k, s in enumerate(record["steps"], start=1)]
    note = stale_note(record)
    if note:
        lines += ["", f"**Note.** {note}"]
    return "\n".join(lines)
