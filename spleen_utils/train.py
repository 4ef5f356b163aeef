"""The training loop of the MONAI spleen recipe.

Dice loss, Adam, automatic mixed precision (fp16 on CUDA, bf16 on a CPU with native bf16),
cached data, sliding-window validation every ``val_interval`` epochs, and the best checkpoint by
validation Dice. Everything a run produces goes to ``out_dir``:

- ``best_model.pt``  self-describing checkpoint of the best validation Dice (atomic write)
- ``last.pt``        the one combined state for ``--resume`` (see below), written before
                     ``best_model.pt``, atomically and with ``fsync``
- ``metrics.jsonl``  one JSON line per epoch
- ``run.json``       configuration, versions, git revision, data checksums, hardware, times
- ``summary.json``   best_val_dice, best_epoch, epochs, train_seconds, profile, device, ...

Exact resume: an interrupted run loses at most the epoch in progress, and ``--resume`` continues
it as if nothing had happened. ``last.pt`` holds the weights, optimizer, grad scaler, learning-rate
schedule, best metric (epoch and per source), skipped steps, the metric history and every random
state (Python, NumPy, torch CPU and CUDA). Every source of randomness of an epoch (crop positions,
augmentation, shuffling, data-loading workers) is re-seeded at its start from ``(seed, epoch,
rank)`` alone, so epoch 3 draws the same numbers whether it follows epoch 2 in one process or
after a restart: 4 epochs straight and 2 + ``--resume`` 2 give the same losses and weights
(tested on CPU). A crash between ``last.pt`` and ``best_model.pt`` is repaired on resume (the
saved state names the best epoch; its weights are the saved ones).

Data-parallel training (DDP) under ``torchrun``: see :mod:`spleen_utils.distributed`.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import distributed
from .config import Config
from .data import count_sources, datalists, dataset_checksums
from .errors import SpleenError
from .io import atomic_path
from .model import atomic_torch_save, build_network, cpu_supports_bf16, resolve_device, save_checkpoint
from .provenance import git_revision, hardware, utc_now, versions, write_json
from .runs import RunDir

#: what ``last.pt`` holds (``state_format``); a state without it is from before exact resume
STATE_FORMAT = "spleen_utils.train_state/2"

WANDB_WARNING = "W&B not configured. Training in local mode only"


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


def source_group(item: dict) -> str:
    """The group a validation case reports under: ``phantom``, ``labelmap`` or ``real:<name>``."""
    source = str(item.get("source", "validation"))
    return source if source.startswith("real:") else source.split(":", 1)[0]


def validate(model, loader, cfg: Config, device, autocast) -> tuple[float, dict[str, float]]:
    """Validation Dice (spleen channel) with the recipe's sliding window.

    Returns the selection metric (the mean over the cases ``cfg.select_on`` names) and the mean
    Dice per source group. Under DDP each rank scores its share of the cases (each batch may carry
    an ``index``: the case's place in the whole validation list); the per-case scores of all ranks
    are gathered and averaged in that order, so the value is the one a single process computes.
    """
    from monai.data import decollate_batch
    from monai.inferers import sliding_window_inference
    from monai.metrics import DiceMetric
    from monai.transforms import AsDiscrete

    r = cfg.recipe
    n = len(r.labels)
    post_pred, post_label = AsDiscrete(argmax=True, to_onehot=n), AsDiscrete(to_onehot=n)
    metric = DiceMetric(include_background=False, reduction="none")
    cases: list[tuple[int, str, float]] = []
    model.eval()
    with torch.no_grad(), autocast():
        for batch in loader:
            image, label = _plain(batch["image"], device), _plain(batch["label"], device)
            out = sliding_window_inference(image, r.sw_roi, r.sw_batch_size, model, overlap=r.overlap)
            preds = [post_pred(o.float()) for o in decollate_batch(out)]
            labels = [post_label(y) for y in decollate_batch(label)]
            scores = metric(y_pred=preds, y=labels).reshape(-1).tolist()
            sources = batch.get("source", ["validation"] * len(scores))
            indices = batch.get("index", [len(cases) + k for k in range(len(scores))])
            cases += [(int(i), str(src), float(score)) for i, src, score in zip(indices, sources, scores)]
    metric.reset()
    gathered = sorted(c for part in distributed.all_gather_object(cases) for c in part)
    groups: dict[str, list[float]] = {}
    selected: list[float] = []
    for _, src, score in gathered:
        group = source_group({"source": src})
        groups.setdefault(group, []).append(score)
        if cfg.select_on == "all" or not group.startswith("real:"):
            selected.append(score)
    by_source = {g: sum(v) / len(v) for g, v in sorted(groups.items())}
    value = sum(selected) / len(selected) if selected else float("nan")
    return value, by_source


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


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The seed of one epoch on one rank: a function of ``(seed, epoch, rank)`` alone."""
    return int(np.random.SeedSequence([int(seed), int(epoch), int(rank)]).generate_state(1)[0])


def seed_epoch(seed: int, epoch: int, rank: int, dataset, generator: torch.Generator) -> int:
    """Re-seed every source of randomness of one training epoch.

    Python's and NumPy's global generators, torch (CPU and every CUDA device), the random
    transforms of ``dataset`` (MONAI's ``set_rnd``: each ``Randomizable`` gets its own seed) and
    the loader's ``generator`` (its shuffling and the seeds of its worker processes).
    """
    from monai.data.utils import set_rnd

    s = epoch_seed(seed, epoch, rank)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)  # also every CUDA device
    set_rnd(dataset, s)
    generator.manual_seed(s)
    return s


def rng_states() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA random states in a form ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(gauss)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore :func:`rng_states`; the torch states must be CPU ``ByteTensor`` s (load with ``map_location="cpu"``)."""
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in states:
        kind, keys, pos, has_gauss, gauss = states["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(gauss)))
    if "torch" in states:
        torch.set_rng_state(states["torch"].cpu())
    cuda = states.get("cuda") or []
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        torch.cuda.set_rng_state_all([c.cpu() for c in cuda[:n]])


def load_state(path: Path) -> dict[str, Any]:
    """Read ``last.pt`` onto the CPU (whatever device wrote it); the caller moves what must move."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file
        raise SpleenError(f"{path}: not a readable training state ({type(e).__name__}); start a new run in another --out.") from None
    if not isinstance(state, dict) or "state_dict" not in state or "epoch" not in state:
        raise SpleenError(f"{path}: not a training state written by spleen-seg train.")
    return state


def training_data(cfg: Config) -> str:
    """What a run learns from, in a few words; travels inside its checkpoint and ONNX file."""
    what = f"{cfg.dataset} (generated CT)" if cfg.dataset.startswith("Synthetic") else cfg.dataset
    if cfg.real_train:
        what += f" + {len(cfg.real_train)} real scan{'s' if len(cfg.real_train) != 1 else ''} ({', '.join(cfg.real_train)})"
    return what


@dataclass
class _Parts:
    """What trains: the network (``net``, saved and validated), its DDP wrapper (``model``), loss and optimiser."""

    net: torch.nn.Module
    model: torch.nn.Module
    loss_fn: Any
    optimizer: torch.optim.Optimizer
    scaler: Any
    schedule: Any
    autocast: Callable[[], Any]
    precision: str


@dataclass
class _Progress:
    """Where a run stands: carried from epoch to epoch and saved in ``last.pt``."""

    start_epoch: int = 1
    best: float = -1.0
    best_epoch: int = 0
    best_by_source: dict[str, float] = field(default_factory=dict)
    elapsed_before: float = 0.0
    history: list[dict] = field(default_factory=list)
    skipped_total: int = 0


@dataclass
class _Data:
    train_ds: Any
    train_loader: Any
    val_loader: Any
    loader_rng: torch.Generator
    n_train: int  # the cases this rank reads (its partition)
    n_val: int


def train(cfg: Config, resume: bool = False, progress: bool = True, max_seconds: float | None = None,
          sync_bn: bool = False) -> dict[str, Any]:
    """Train ``cfg`` and return its summary (also written to ``summary.json``).

    ``max_seconds`` stops after the epoch during which the budget ran out (a validation is
    then run so the best checkpoint reflects the last weights).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) this is one rank of a DDP job: gloo on CPU, NCCL on
    CUDA, each rank caching only its partition of the cases; ``sync_bn`` turns the network's batch
    norms into ``SyncBatchNorm`` (statistics over all ranks' crops; CUDA only).
    """
    from monai.utils import set_determinism
    from tqdm.auto import tqdm

    from .progress import report

    t_start = time.time()
    run = RunDir(cfg.out_dir)
    if not resume and run.last_state.exists():
        raise SpleenError(f"{run} already holds a run; pass --resume to continue it or choose another --out.")
    if resume and not run.last_state.exists():
        raise SpleenError(f"{run}: nothing to resume (no last.pt); start without --resume.")
    train_items, val_items = datalists(cfg)  # a bad source or sample name fails before any folder is made

    device = resolve_device(cfg.device)
    dist, device = distributed.setup(device)
    if sync_bn and device.type != "cuda":
        raise SpleenError("--sync-bn needs CUDA GPUs (SyncBatchNorm has no CPU kernel); leave it out on CPU.")
    main = dist.is_main
    progress = progress and main
    if main:
        run.path.mkdir(parents=True, exist_ok=True)
    set_determinism(seed=cfg.seed)
    data = _data(cfg, dist, train_items, val_items, progress)
    parts = _parts(cfg, device, dist, sync_bn)
    if resume:
        at = _resume(cfg, run, parts, main)
    else:
        at = _Progress()
        if main and run.metrics.exists():
            run.metrics.unlink()
    if dist.enabled:
        from torch.nn.parallel import DistributedDataParallel

        # channels-last 1x1x1 kernels have two valid stride sets; DDP's bucket views pick the other
        # one and warn at every step (a copy, not an error)
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        parts.model = DistributedDataParallel(parts.net, device_ids=[device.index] if device.type == "cuda" else None)

    run_info = _run_record(cfg, parts, device, dist, train_items, val_items, data, resume_at=at.start_epoch if resume else None,
                           sync_bn=sync_bn)
    if main:
        write_json(run_info, run.run_record)
    wb = wandb_run(cfg) if main else None

    t_train = time.time()
    epoch = at.start_epoch - 1
    if main:
        report("training", at.start_epoch - 1, cfg.epochs, unit="epoch", elapsed_s=at.elapsed_before)
    bar = tqdm(range(at.start_epoch, cfg.epochs + 1), desc="train", unit="epoch", disable=not progress,
               initial=at.start_epoch - 1, total=cfg.epochs)
    for epoch in bar:
        t_epoch = time.time()
        seed_epoch(cfg.seed, epoch, dist.rank, data.train_ds, data.loader_rng)
        mean_loss, skipped = _train_epoch(parts, data.train_loader, device, dist)
        row: dict[str, Any] = {"epoch": epoch, "loss": mean_loss, "val_dice": None,
                               "skipped_steps": skipped, "lr": parts.optimizer.param_groups[0]["lr"]}
        if parts.schedule is not None:
            parts.schedule.step()
        at.skipped_total += skipped
        out_of_time = max_seconds is not None and at.elapsed_before + time.time() - t_train >= max_seconds
        # one rank's clock decides for all: every rank must run the same number of epochs
        out_of_time = bool(distributed.all_gather_object(out_of_time)[0])
        new_best = False
        if epoch % cfg.val_interval == 0 or epoch == cfg.epochs or out_of_time:
            dice, by_source = validate(parts.net, data.val_loader, cfg, device, parts.autocast)
            row["val_dice"] = dice
            row["val_dice_by_source"] = by_source
            if dice > at.best:
                at.best, at.best_epoch, at.best_by_source, new_best = dice, epoch, by_source, True
        row["seconds"] = time.time() - t_epoch
        row["elapsed_s"] = at.elapsed_before + time.time() - t_train
        at.history.append(row)
        if main:
            _checkpoint(cfg, run, parts, at, row, new_best, dist.world_size)
        if wb is not None:
            wb.log({k: v for k, v in row.items() if v is not None}, step=epoch)
        bar.set_postfix(loss=f"{row['loss']:.3f}" if row["loss"] is not None else "nan", best_dice=f"{at.best:.3f}")
        if main:
            report("training", epoch, cfg.epochs, unit="epoch", elapsed_s=row["elapsed_s"],
                   best_val_dice=round(at.best, 3) if at.best >= 0 else None)
        if out_of_time:
            break
    bar.close()
    ranks_in_sync = None
    if dist.enabled:  # DDP keeps the replicas equal; a check that costs one small gather
        digests = distributed.all_gather_object(_weights_digest(parts.net))
        ranks_in_sync = len(set(digests)) == 1
    if wb is not None:
        wb.finish()

    summary = _summary(cfg, at, epoch, at.elapsed_before + time.time() - t_train, device, parts.precision, dist,
                       train_items, val_items, run_info["selection"])
    if ranks_in_sync is not None:
        summary["ranks_in_sync"] = ranks_in_sync
    if main:
        write_json(summary, run.summary)
        run_info["finished"] = utc_now()
        run_info["total_seconds"] = round(time.time() - t_start, 1)
        write_json(run_info, run.run_record)
    distributed.barrier()  # no rank leaves (and tears down the group) before rank 0 has written
    return summary


def _data(cfg: Config, dist, train_items: list[dict], val_items: list[dict], progress: bool) -> _Data:
    """The cached datasets and loaders of this rank."""
    from monai.data import CacheDataset, DataLoader, partition_dataset

    from .transforms import train_transforms, val_transforms

    r = cfg.recipe
    # the loaders see files only (plus each validation case's source and place): mixed text keys do
    # not collate. Under DDP each rank reads and caches only its partition: the training cases padded
    # so every rank takes the same number of steps, the validation cases split without padding
    files = ("image", "label", "tissue")
    train_data = [{k: v for k, v in i.items() if k in files} for i in train_items]
    val_data = [{"image": i["image"], "label": i["label"], "source": i.get("source", "validation"), "index": n}
                for n, i in enumerate(val_items)]
    if dist.enabled:
        train_data = partition_dataset(train_data, num_partitions=dist.world_size, shuffle=True, seed=cfg.seed,
                                       even_divisible=True)[dist.rank]
        val_data = partition_dataset(val_data, num_partitions=dist.world_size, even_divisible=False)[dist.rank]
    train_ds = CacheDataset(train_data, train_transforms(r, cfg.appearance_prob, cfg.wild), cache_rate=cfg.cache_rate, num_workers=cfg.num_workers or None, progress=progress)
    val_ds = CacheDataset(val_data, val_transforms(r), cache_rate=cfg.cache_rate, num_workers=cfg.num_workers or None, progress=progress)
    # one generator drives shuffling and the workers' seeds; it is re-seeded at every epoch
    loader_rng = torch.Generator()
    train_loader = DataLoader(train_ds, batch_size=cfg.batch_size, shuffle=True, num_workers=cfg.num_workers, generator=loader_rng)
    val_loader = DataLoader(val_ds, batch_size=1, num_workers=cfg.num_workers)
    return _Data(train_ds, train_loader, val_loader, loader_rng, len(train_data), len(val_data))


def _parts(cfg: Config, device: torch.device, dist, sync_bn: bool) -> _Parts:
    """The network, loss, optimiser, mixed precision and learning-rate schedule of ``cfg``."""
    from monai.losses import DiceCELoss, DiceLoss

    r = cfg.recipe
    # channels-last (NDHWC) activations: oneDNN's 3-D convolutions were measured 18% faster per
    # training step on this CPU (0.64 vs 0.78 s for four 64^3 crops), cuDNN's too with AMP
    net = build_network(r)
    if sync_bn and dist.enabled:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net = net.to(device, memory_format=torch.channels_last_3d)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True) if cfg.loss == "dicece" else DiceLoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.Adam(net.parameters(), r.learning_rate)
    autocast, precision = amp_context(device, cfg.amp)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    schedule = None
    if cfg.lr_schedule == "cosine":
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs, eta_min=r.learning_rate * 0.02)
    # ``model`` is what trains (DDP's wrapper under torchrun, set by the caller); ``net`` is what is saved and validated
    return _Parts(net, net, loss_fn, optimizer, scaler, schedule, autocast, precision)


def _resume(cfg: Config, run: RunDir, parts: _Parts, main: bool) -> _Progress:
    """Load ``last.pt`` into ``parts`` and the random states; returns where the run stood."""
    # onto the CPU first: the RNG states must stay CPU ByteTensors; load_state_dict moves the rest
    state = load_state(run.last_state)
    parts.net.load_state_dict(state["state_dict"])
    parts.optimizer.load_state_dict(state["optimizer"])
    parts.scaler.load_state_dict(state["scaler"])
    if parts.schedule is not None and state.get("schedule"):
        parts.schedule.load_state_dict(state["schedule"])
    at = _Progress(start_epoch=state["epoch"] + 1, best=state["best_metric"], best_epoch=state["best_epoch"],
                   best_by_source=json.loads(state.get("best_by_source", "{}")),
                   elapsed_before=state.get("train_seconds", 0.0), skipped_total=int(state.get("skipped_steps", 0)))
    if "history" in state:
        at.history = json.loads(state["history"])
    else:  # a state from before exact resume: the history lives only in metrics.jsonl
        at.history = _read_metrics(run.metrics, state["epoch"])
    set_rng_states(state.get("rng", {"torch": state["torch_rng"]} if "torch_rng" in state else {}))
    if main:
        with atomic_path(run.metrics) as tmp:
            tmp.write_text("".join(json.dumps(h) + "\n" for h in at.history))
        # the best epoch's state was saved, then the run stopped before best_model.pt was
        # written: its weights are the ones just loaded
        if at.best_epoch == state["epoch"] and at.best_epoch > 0 and _checkpoint_epoch(run.best_model) != at.best_epoch:
            save_checkpoint(parts.net, cfg.recipe, run.best_model, epoch=at.best_epoch, best_metric=at.best,
                            profile=cfg.profile, training_data=training_data(cfg))
    return at


def _run_record(cfg: Config, parts: _Parts, device: torch.device, dist, train_items: list[dict], val_items: list[dict],
                data: _Data, resume_at: int | None, sync_bn: bool) -> dict[str, Any]:
    """``run.json``: configuration, versions, git revision, hardware, split, data checksums, DDP layout."""
    return {
        "config": cfg.to_dict(),
        "precision": parts.precision,
        "versions": versions(),
        "git_revision": git_revision(),
        "hardware": hardware(device),
        "split": {"train": [Path(i["image"]).name for i in train_items], "val": [Path(i["image"]).name for i in val_items]},
        "sources": {"train": count_sources(train_items), "val": count_sources(val_items)},
        "selection": "best checkpoint by mean validation Dice over "
        + ("all validation cases, real ones included" if cfg.select_on == "all" else "the generated validation cases (real held-out scans are not used)"),
        "data_md5": dataset_checksums(train_items + val_items),
        "started": utc_now(),
        "resumed_at_epoch": resume_at,
        "world_size": dist.world_size,
        "distributed_backend": dist.backend,
        "sync_bn": bool(sync_bn and dist.enabled),
        "batch_size_global": cfg.batch_size * dist.world_size,
        # what each rank read and cached (its partition; the training cases padded to equal shares)
        "cases_per_rank": {"train": distributed.all_gather_object(data.n_train),
                           "val": distributed.all_gather_object(data.n_val)},
    }


def _train_epoch(parts: _Parts, loader, device: torch.device, dist) -> tuple[float | None, int]:
    """One pass over the training loader: the mean loss (over every rank's steps) and the skipped steps."""
    parts.model.train()
    losses, skipped = [], 0
    for batch in loader:
        # plain tensors in the hot loop: MetaTensor bookkeeping on every op costs time
        image, label = _plain(batch["image"], device), _plain(batch["label"], device)
        image = image.contiguous(memory_format=torch.channels_last_3d)
        parts.optimizer.zero_grad(set_to_none=True)
        with parts.autocast():
            logits = parts.model(image)
        # the loss in fp32, outside autocast: a bf16/fp16 softmax and Dice sum can overflow
        loss = parts.loss_fn(logits.float(), label)
        # a non-finite step is skipped, not applied, and counted (by every rank when one has it:
        # DDP's gradient averaging needs all ranks in the same backward)
        if not distributed.all_true(bool(torch.isfinite(loss)), device):
            skipped += 1
            continue
        parts.scaler.scale(loss).backward()
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        losses.append(loss.item())
    distributed.broadcast_buffers(parts.net)  # one set of batch-norm statistics to validate and save
    if dist.enabled:  # the mean over every rank's steps, as one process would log it
        gathered = distributed.all_gather_object((sum(losses), len(losses), skipped))
        total, count = sum(p[0] for p in gathered), sum(p[1] for p in gathered)
        return (total / count if count else None), max(p[2] for p in gathered)
    return (sum(losses) / len(losses) if losses else None), skipped


def _checkpoint(cfg: Config, run: RunDir, parts: _Parts, at: _Progress, row: dict, new_best: bool, world_size: int) -> None:
    """After an epoch (rank 0): its metrics line, the combined state, and the best model when it is one."""
    epoch = row["epoch"]
    with run.metrics.open("a") as f:
        f.write(json.dumps(row) + "\n")
    # the combined state first (atomic, fsync'd), then the best model: after a crash between
    # the two, resume sees that this epoch was the best and rewrites best_model.pt from it
    atomic_torch_save(
        {
            "state_format": STATE_FORMAT,
            "state_dict": parts.net.state_dict(),
            "optimizer": parts.optimizer.state_dict(),
            "scaler": parts.scaler.state_dict(),
            "schedule": parts.schedule.state_dict() if parts.schedule is not None else None,
            "epoch": epoch,
            "best_metric": at.best,
            "best_epoch": at.best_epoch,
            "best_by_source": json.dumps(at.best_by_source),
            "skipped_steps": at.skipped_total,
            "train_seconds": row["elapsed_s"],
            "history": json.dumps(at.history),
            "rng": rng_states(),
            "seed": cfg.seed,
            "world_size": world_size,
        },
        run.last_state,
    )
    if new_best:
        save_checkpoint(parts.net, cfg.recipe, run.best_model, epoch=epoch, best_metric=at.best, profile=cfg.profile,
                        training_data=training_data(cfg))


def _summary(cfg: Config, at: _Progress, epoch: int, train_seconds: float, device: torch.device, precision: str, dist,
             train_items: list[dict], val_items: list[dict], selection: str) -> dict[str, Any]:
    """``summary.json``: the best validation Dice (overall and per source) and how the run went."""
    return {
        "profile": cfg.profile,
        "best_val_dice": at.best,
        "best_epoch": at.best_epoch,
        "best_val_dice_by_source": at.best_by_source,
        "selection": selection,
        "skipped_steps": at.skipped_total,
        "epochs": epoch,
        "epochs_planned": cfg.epochs,
        "train_seconds": round(train_seconds, 1),
        "device": str(device),
        "precision": precision,
        "n_train": len(train_items),
        "n_val": len(val_items),
        "dataset": cfg.dataset,
        "synthetic": cfg.dataset.startswith("Synthetic"),
        "real_train": list(cfg.real_train),
        "real_val": list(cfg.real_val),
        "world_size": dist.world_size,
    }


def _weights_digest(net: torch.nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _checkpoint_epoch(path: Path) -> int | None:
    """The epoch a best checkpoint was saved at, or ``None`` when there is none readable."""
    if not path.exists():
        return None
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True).get("epoch", -1))
    except Exception:
        return None
