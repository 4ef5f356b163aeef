"""The training loop of the MONAI spleen recipe.

Dice loss, Adam, automatic mixed precision (fp16 on CUDA, bf16 on a CPU with native bf16),
cached data, sliding-window validation every ``val_interval`` epochs, and the best checkpoint by
validation Dice. Everything a run produces goes to ``out_dir``:

- ``best_model.pt``  self-describing checkpoint of the best validation Dice (atomic write)
- ``last.pt``        full state for ``--resume`` (weights, optimizer, scaler, epoch, best, RNG)
- ``metrics.jsonl``  one JSON line per epoch
- ``run.json``       configuration, versions, git revision, data checksums, hardware, times
- ``summary.json``   best_val_dice, best_epoch, epochs, train_seconds, profile, device, ...

An interrupted run loses at most the epoch in progress: ``--resume`` continues from ``last.pt``
with the optimizer state, the best metric so far and the metric history intact.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from .config import PROJECT_ROOT, Config
from .data import dataset_checksums, load_datalist, split_datalist
from .errors import SpleenError
from .io import atomic_path
from .model import atomic_torch_save, build_network, cpu_supports_bf16, library_versions, resolve_device, save_checkpoint

WANDB_WARNING = "W&B not configured. Training in local mode only"


def git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def hardware(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def wandb_run(cfg: Config):
    """A W&B run when W&B is installed and configured, else ``None`` (after one warning)."""
    configured = bool(os.environ.get("WANDB_API_KEY"))
    if not configured:
        netrc = Path.home() / ".netrc"
        configured = netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    if configured:
        try:
            import wandb

            return wandb.init(project="spleen-seg", config=cfg.to_dict(), name=f"{cfg.profile}-{cfg.seed}")
        except Exception as e:  # no package, no network: keep training locally
            warnings.warn(f"{WANDB_WARNING} ({type(e).__name__}: {e})", stacklevel=2)
            return None
    warnings.warn(WANDB_WARNING, stacklevel=2)
    return None


def amp_context(device: torch.device, enabled: bool) -> tuple[Callable[[], Any], str]:
    if enabled and device.type == "cuda":
        return (lambda: torch.autocast("cuda", dtype=torch.float16)), "fp16"
    if enabled and device.type == "cpu" and cpu_supports_bf16():
        return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)), "bf16"
    return contextlib.nullcontext, "fp32"


def _plain(x, device) -> torch.Tensor:
    return (x.as_tensor() if hasattr(x, "as_tensor") else x).to(device, non_blocking=True)


def validate(model, loader, cfg: Config, device, autocast) -> float:
    """Mean Dice (spleen channel) over ``loader`` with the recipe's sliding window."""
    from monai.data import decollate_batch
    from monai.inferers import sliding_window_inference
    from monai.metrics import DiceMetric
    from monai.transforms import AsDiscrete

    r = cfg.recipe
    n = len(r.labels)
    post_pred, post_label = AsDiscrete(argmax=True, to_onehot=n), AsDiscrete(to_onehot=n)
    metric = DiceMetric(include_background=False, reduction="mean")
    model.eval()
    with torch.no_grad(), autocast():
        for batch in loader:
            image, label = _plain(batch["image"], device), _plain(batch["label"], device)
            out = sliding_window_inference(image, r.sw_roi, r.sw_batch_size, model, overlap=r.overlap)
            preds = [post_pred(o.float()) for o in decollate_batch(out)]
            labels = [post_label(y) for y in decollate_batch(label)]
            metric(y_pred=preds, y=labels)
    value = float(metric.aggregate().item())
    metric.reset()
    return value


def _read_metrics(path: Path, up_to_epoch: int) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by an interruption
        if row.get("epoch", 0) <= up_to_epoch:
            rows.append(row)
    return rows


def _write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=str))


def train(cfg: Config, resume: bool = False, progress: bool = True, max_seconds: float | None = None) -> dict[str, Any]:
    """Train ``cfg`` and return its summary (also written to ``summary.json``).

    ``max_seconds`` stops after the epoch during which the budget ran out (a validation is
    then run so the best checkpoint reflects the last weights).
    """
    from monai.data import CacheDataset, DataLoader
    from monai.losses import DiceLoss
    from monai.utils import set_determinism
    from tqdm.auto import tqdm

    from .transforms import train_transforms, val_transforms

    t_start = time.time()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    last_path, metrics_path = out / "last.pt", out / "metrics.jsonl"
    if not resume and last_path.exists():
        raise SpleenError(f"{out} already holds a run; pass --resume to continue it or choose another --out.")
    if resume and not last_path.exists():
        raise SpleenError(f"{out}: nothing to resume (no last.pt); start without --resume.")

    device = resolve_device(cfg.device)
    set_determinism(seed=cfg.seed)
    items = load_datalist(cfg.dataset_dir, "training")
    train_items, val_items = split_datalist(items, cfg.val_cases, cfg.max_cases)
    r = cfg.recipe

    train_ds = CacheDataset(train_items, train_transforms(r), cache_rate=cfg.cache_rate, num_workers=cfg.num_workers or None, progress=progress)
    val_ds = CacheDataset(val_items, val_transforms(r), cache_rate=cfg.cache_rate, num_workers=cfg.num_workers or None, progress=progress)
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers)
    val_loader = DataLoader(val_ds, batch_size=1, num_workers=cfg.num_workers)

    model = build_network(r).to(device)
    loss_fn = DiceLoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(model.parameters(), r.learning_rate)
    autocast, precision = amp_context(device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")

    start_epoch, best, best_epoch, elapsed_before = 1, -1.0, 0, 0.0
    if resume:
        state = torch.load(last_path, map_location=device, weights_only=True)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, best, best_epoch = state["epoch"] + 1, state["best_metric"], state["best_epoch"]
        elapsed_before = state.get("train_seconds", 0.0)
        torch.set_rng_state(state["torch_rng"])
        history = _read_metrics(metrics_path, state["epoch"])
        metrics_path.write_text("".join(json.dumps(h) + "\n" for h in history))
    elif metrics_path.exists():
        metrics_path.unlink()

    run_info = {
        "config": cfg.to_dict(),
        "precision": precision,
        "versions": library_versions(),
        "git_revision": git_revision(),
        "hardware": hardware(device),
        "split": {"train": [Path(i["image"]).name for i in train_items], "val": [Path(i["image"]).name for i in val_items]},
        "data_md5": dataset_checksums(train_items + val_items),
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "resumed_at_epoch": start_epoch if resume else None,
    }
    _write_json(out / "run.json", run_info)
    wb = wandb_run(cfg)

    t_train = time.time()
    epoch = start_epoch - 1
    bar = tqdm(range(start_epoch, cfg.epochs + 1), desc="train", unit="epoch", disable=not progress, initial=start_epoch - 1, total=cfg.epochs)
    for epoch in bar:
        t_epoch = time.time()
        model.train()
        losses = []
        for batch in train_loader:
            # plain tensors in the hot loop: MetaTensor bookkeeping on every op costs time
            image, label = _plain(batch["image"], device), _plain(batch["label"], device)
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn(model(image), label)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(loss.item())
        row: dict[str, Any] = {"epoch": epoch, "loss": sum(losses) / len(losses), "val_dice": None}
        out_of_time = max_seconds is not None and elapsed_before + time.time() - t_train >= max_seconds
        if epoch % cfg.val_interval == 0 or epoch == cfg.epochs or out_of_time:
            dice = validate(model, val_loader, cfg, device, autocast)
            row["val_dice"] = dice
            if dice > best:
                best, best_epoch = dice, epoch
                save_checkpoint(model, r, out / "best_model.pt", epoch=epoch, best_metric=dice, profile=cfg.profile)
        row["seconds"] = time.time() - t_epoch
        row["elapsed_s"] = elapsed_before + time.time() - t_train
        with metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        atomic_torch_save(
            {
                "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,
                "best_metric": best,
                "best_epoch": best_epoch,
                "train_seconds": row["elapsed_s"],
                "torch_rng": torch.get_rng_state(),
            },
            last_path,
        )
        if wb is not None:
            wb.log({k: v for k, v in row.items() if v is not None}, step=epoch)
        bar.set_postfix(loss=f"{row['loss']:.3f}", best_dice=f"{best:.3f}")
        if out_of_time:
            break
    bar.close()
    if wb is not None:
        wb.finish()

    train_seconds = elapsed_before + time.time() - t_train
    summary = {
        "profile": cfg.profile,
        "best_val_dice": best,
        "best_epoch": best_epoch,
        "epochs": epoch,
        "epochs_planned": cfg.epochs,
        "train_seconds": round(train_seconds, 1),
        "device": str(device),
        "precision": precision,
        "n_train": len(train_items),
        "n_val": len(val_items),
        "dataset": cfg.dataset,
        "synthetic": cfg.dataset.startswith("Synthetic"),
    }
    _write_json(out / "summary.json", summary)
    run_info["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    run_info["total_seconds"] = round(time.time() - t_start, 1)
    _write_json(out / "run.json", run_info)
    return summary
