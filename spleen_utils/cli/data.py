"""``spleen-seg data download`` and ``spleen-seg data synthetic``: a dataset in the MSD layout."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_data_download(a: argparse.Namespace) -> int:
    from ..data import MSD_MD5, MSD_URL, download_msd

    # a mirror serves the same archive: MONAI's MD5 still applies unless --md5 says otherwise
    md5 = MSD_MD5 if a.md5 is None else (None if a.md5.strip().lower() == "none" else a.md5)
    path = download_msd(a.root, url=a.url or MSD_URL, md5=md5)
    print(f"MSD Task09 Spleen is ready in {path}")
    return 0


def cmd_data_synthetic(a: argparse.Namespace) -> int:
    from ..config import get_config
    from ..synthetic import write_profile_dataset

    cfg = get_config("quick", data_root=Path(a.root), synthetic_cases=a.cases, synthetic_test_cases=a.test_cases,
                     labelmap_cases=a.labelmap_cases, seed=a.seed)
    path = write_profile_dataset(cfg, progress=not a.quiet)
    print(f"synthetic dataset ({cfg.synthetic_cases} phantoms + {cfg.labelmap_cases} cases per real label map, "
          f"{cfg.synthetic_test_cases} test cases, seed {cfg.seed}) is ready in {path}")
    return 0


def register(sub) -> None:
    d = sub.add_parser("data", help="get a dataset in the MSD layout")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="SOURCE")
    dl = dsub.add_parser("download", help="MSD Task09 Spleen from the official mirror (verified, idempotent)")
    dl.add_argument("--root", default="data", help="folder that receives Task09_Spleen/ (default: data)")
    dl.add_argument("--url", help="a mirror of Task09_Spleen.tar")
    dl.add_argument("--md5", help="expected MD5 of the archive (default: MONAI's published one, also for a --url mirror; "
                                  "'none' skips the check, with a warning)")
    dl.set_defaults(func=cmd_data_download)
    sy = dsub.add_parser("synthetic", help="write a synthetic CT dataset in the MSD layout (the quick profile's)")
    sy.add_argument("--root", default="data", help="folder that receives Synthetic_Spleen/ (default: data)")
    sy.add_argument("--cases", type=int, help="phantom training cases (default: the quick profile's)")
    sy.add_argument("--labelmap-cases", type=int, help="cases painted on each shipped real label map (default: the quick profile's)")
    sy.add_argument("--test-cases", type=int, help="test cases (default: the quick profile's)")
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--quiet", action="store_true", help="no progress bar")
    sy.set_defaults(func=cmd_data_synthetic)
