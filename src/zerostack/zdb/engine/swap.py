"""Crash-safe replacement of a namespace's files by a freshly built set (compaction, repair).

New files are built in a `compact/` folder inside each namespace directory. Once they are
durable, a READY marker listing the files to install and to retire is written; the swap then
moves files one by one. A crash before READY leaves the old files untouched (the build is
discarded); a crash after it is rolled forward the next time the namespace is opened. Either
way the namespace opens with all its data.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from zerostack.zdb.engine.errors import ZdbError
from zerostack.zdb.engine.files import fsync_dir, write_new_file

log = logging.getLogger("zerostack.zdb.engine")

WORK = "compact"
RETIRED = "retired"
READY = "READY"

Step = Callable[[str], None]


def work_dirs(index_root: Path, data_root: Path) -> tuple[Path, Path]:
    return index_root / WORK, data_root / WORK


def start_build(index_root: Path, data_root: Path) -> tuple[Path, Path]:
    """Fresh, empty work folders (any earlier unfinished build is dropped first)."""
    recover(index_root, data_root)
    iwork, dwork = work_dirs(index_root, data_root)
    for d in (iwork, dwork):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    return iwork, dwork


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != READY)


def _fsync_all(folder: Path) -> None:
    for p in folder.iterdir():
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(folder)


def install(index_root: Path, data_root: Path, retire_index: list[str], retire_data: list[str],
            step: Step | None = None) -> None:
    """Swap the built files in. `retire_*` name current files that the new set replaces
    or makes obsolete (e.g. i3 when the new set stops at i1)."""
    iwork, dwork = work_dirs(index_root, data_root)
    _fsync_all(iwork)
    _fsync_all(dwork)
    plan = {"index": _names(iwork), "data": _names(dwork),
            "retire_index": retire_index, "retire_data": retire_data}
    if step:
        step("built")
    write_new_file(iwork / READY, json.dumps(plan).encode())
    if step:
        step("ready")
    _roll_forward(index_root, data_root, plan, step)


def recover(index_root: Path, data_root: Path) -> bool:
    """Finish or discard a swap interrupted by a crash; True if one was found."""
    iwork, dwork = work_dirs(index_root, data_root)
    marker = iwork / READY
    if marker.exists():
        try:
            plan = json.loads(marker.read_text())
        except ValueError as exc:
            raise ZdbError(f"{marker} is unreadable ({exc}); remove {iwork} and {dwork} to keep "
                           "the files in place, or run `zerostack zdb check --repair`") from exc
        log.warning("event=zdb.repair action=finish-swap index=%s", index_root)
        _roll_forward(index_root, data_root, plan, None)
        return True
    found = False
    for d in (iwork, dwork, index_root / RETIRED, data_root / RETIRED):
        if d.exists():
            # Without READY nothing was moved: the build was incomplete.
            shutil.rmtree(d)
            found = True
    if found:
        log.warning("event=zdb.repair action=discard-unfinished-build index=%s", index_root)
    return found


def _roll_forward(index_root: Path, data_root: Path, plan: dict[str, list[str]],
                  step: Step | None) -> None:
    # Every move is idempotent: a crash anywhere here is finished by recover().
    for root, names, retire in ((data_root, plan["data"], plan["retire_data"]),
                                (index_root, plan["index"], plan["retire_index"])):
        work, retired = root / WORK, root / RETIRED
        retired.mkdir(exist_ok=True)
        for name in retire:
            # names the new set also has are swapped below, once their new file is in place
            if name not in names and (root / name).exists():
                os.replace(root / name, retired / name)
        for name in names:
            if (work / name).exists():
                if (root / name).exists():
                    os.replace(root / name, retired / name)
                os.replace(work / name, root / name)
                if step:
                    step(f"moved {root.name}/{name}")
        fsync_dir(root)
    for root in (data_root, index_root):
        shutil.rmtree(root / RETIRED, ignore_errors=True)
    shutil.rmtree(data_root / WORK, ignore_errors=True)
    (index_root / WORK / READY).unlink(missing_ok=True)
    shutil.rmtree(index_root / WORK, ignore_errors=True)
    fsync_dir(index_root)
    fsync_dir(data_root)
