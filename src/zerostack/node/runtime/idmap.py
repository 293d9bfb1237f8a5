"""Host id ranges for container user namespaces: each group of containers (a deployment on a
node) gets 65,536 host uids and gids of its own, claimed in a registry every node on the
machine shares, so no two tenants ever map to the same host ids.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path

from zerostack.node.runtime.spec import ContainerError

RANGE = 65536
# Range n maps container ids 0..65535 to n*65536.. on the host. The first ranges are left to
# the host's own users and the subordinate ids `useradd` hands out (from 100000 up).
FIRST = 256
LAST = 65534  # (uid_t)-1 is never a valid id
REGISTRY = Path("/var/lib/zerostack/idmap")


class IdRegistry:
    """Claims of host id ranges: one file per claimed range, named by its index."""

    def __init__(self, root: Path = REGISTRY) -> None:
        self.root = root

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.root / ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _claims(self) -> dict[int, dict[str, str]]:
        out: dict[int, dict[str, str]] = {}
        for p in self.root.iterdir():
            if not p.name.isdigit():
                continue
            try:
                out[int(p.name)] = json.loads(p.read_text())
            except (OSError, ValueError):
                continue
        return out

    def claim(self, group: str, owner: Path) -> int:
        """The host base id of `group`'s range, claiming a free range if it has none.

        `owner` is the runtime's container directory; a claim whose owner holds no member of
        its group any more (its runtime crashed before releasing it) is taken back."""
        with self._locked():
            claims = self._claims()
            for n, c in claims.items():
                if c.get("group") == group and c.get("owner") == str(owner):
                    return n * RANGE
            for n in range(FIRST, LAST + 1):
                held = claims.get(n)
                if held is not None and _has_member(held.get("owner", ""), held.get("group", "")):
                    continue
                tmp = self.root / f".{n}.tmp"
                tmp.write_text(json.dumps({"group": group, "owner": str(owner)}))
                os.replace(tmp, self.root / str(n))
                return n * RANGE
        raise ContainerError("no free host id range is left for a user namespace")

    def release(self, group: str, owner: Path) -> None:
        """Give `group`'s range back once no container in `owner` belongs to the group."""
        with self._locked():
            if _has_member(str(owner), group):
                return
            for n, c in self._claims().items():
                if c.get("group") == group and c.get("owner") == str(owner):
                    (self.root / str(n)).unlink(missing_ok=True)


def _has_member(owner: str, group: str) -> bool:
    """True when a container directory under `owner` records membership of `group`."""
    if not group or not owner.startswith("/") or not os.path.isdir(owner):
        return False
    for d in Path(owner).iterdir():
        try:
            if json.loads((d / "idmap.json").read_text()).get("group") == group:
                return True
        except (OSError, ValueError):
            continue
    return False
