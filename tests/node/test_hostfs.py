"""Names the node builds paths from (property tests), opening beneath a root without
links, private modes, and bounded log reads, on real files."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zerostack.node.hostfs import (
    check_component,
    create_private,
    open_beneath,
    private_dir,
    restrict,
    restrict_tree,
)
from zerostack.node.provisioners import ProvisionError, WorkloadID, check_workload_name
from zerostack.node.provisioners.container import check_mountpoint
from zerostack.node.runtime import ContainerError, ContainerRuntime, read_logs
from zerostack.node.runtime.logs import LOG_NAME, RotatingLog

NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
names = st.from_regex(NAME, fullmatch=True)
anything = st.one_of(st.text(max_size=80),
                     st.text(alphabet="ab./\x00\n-_ ", max_size=12),
                     st.sampled_from(["..", ".", "", "/", "a/..", "../a", "a\n", "\na",
                                      "A", "a" * 64, "-a", "_a", "a b", "a\x00", "é"]))


@given(names)
def test_every_name_of_the_pattern_is_a_plain_path_component(name: str) -> None:
    assert check_workload_name(name) == name
    wid = WorkloadID(7, name)
    assert check_component(wid.key) == wid.key
    assert check_component(f"zs-0123456789-{wid.key}")


@given(anything)
def test_only_names_of_the_pattern_pass(text: str) -> None:
    if NAME.fullmatch(text):
        assert check_workload_name(text) == text
        return
    with pytest.raises(ProvisionError, match="invalid workload name"):
        check_workload_name(text)
    with pytest.raises(ProvisionError, match="invalid workload name"):
        WorkloadID(1, text)


@pytest.mark.parametrize("name", ["web/../other", "../..", "/etc/passwd", "web\x00", "web\n",
                                  "a" * 64, "", ".", "web/"])
def test_traversal_names_are_refused(name: str) -> None:
    with pytest.raises(ProvisionError, match="invalid workload name"):
        WorkloadID(5, name)


@pytest.mark.parametrize("contract", [-1, 1 << 63, True, "5", 5.0])
def test_contract_ids_are_bounded_integers(contract: object) -> None:
    with pytest.raises(ProvisionError, match="invalid contract id"):
        WorkloadID(contract, "web")  # type: ignore[arg-type]


@given(st.text(max_size=300))
def test_a_component_is_never_a_path(text: str) -> None:
    try:
        check_component(text)
    except ValueError:
        return
    assert text not in ("", ".", "..") and "/" not in text and "\x00" not in text


@pytest.mark.parametrize("target", ["/data", "/srv/www", "/a-b/c_d.e"])
def test_plain_mount_points_pass(target: str) -> None:
    assert check_mountpoint(target) == target


@pytest.mark.parametrize("target", ["data", "/", "/data/", "/a//b", "/a/../../etc", "/./a",
                                    "/a\x00", "/" + "a" * 1100])
def test_odd_mount_points_are_refused(target: str) -> None:
    with pytest.raises(ProvisionError, match="mount point"):
        check_mountpoint(target)


def test_open_beneath_follows_no_link_on_the_way(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_text("inside")
    outside = tmp_path / "outside"
    (outside / "b").mkdir(parents=True)
    (outside / "b" / "f").write_text("outside")
    fd = open_beneath(root, ["a", "b", "f"], os.O_RDONLY)
    with os.fdopen(fd) as f:
        assert f.read() == "inside"
    (root / "link").symlink_to(outside)
    (root / "a" / "b" / "flink").symlink_to(outside / "b" / "f")
    for parts in (["link", "b", "f"], ["a", "b", "flink"], ["link"]):
        with pytest.raises(OSError):
            os.close(open_beneath(root, parts, os.O_RDONLY))
    for bad in (["a", "..", "..", "outside"], ["a/b"], ["/etc"], [""], ["a\x00"]):
        with pytest.raises(ValueError):
            open_beneath(root, bad)
    os.mkfifo(root / "fifo")
    fd = open_beneath(root, ["fifo"], os.O_RDONLY)  # does not block
    assert stat.S_ISFIFO(os.fstat(fd).st_mode)
    os.close(fd)


def test_private_modes(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        d = private_dir(tmp_path / "x" / "y")
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
        (tmp_path / "open").mkdir(mode=0o755)
        (tmp_path / "open" / "f").write_text("x")
        os.chmod(tmp_path / "open" / "f", 0o644)
        (tmp_path / "open" / "link").symlink_to("/etc/passwd")
        restrict_tree(tmp_path / "open")
        assert stat.S_IMODE((tmp_path / "open").stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / "open" / "f").stat().st_mode) == 0o600
        assert stat.S_IMODE(os.stat("/etc/passwd").st_mode) == 0o644  # link not followed
        restrict(tmp_path / "missing")  # nothing there: fine
        os.close(create_private(tmp_path / "open" / "f"))
        os.close(create_private(tmp_path / "new"))
        assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o600
        with pytest.raises(OSError):
            create_private(tmp_path / "open" / "link")
        (tmp_path / "dirlink").symlink_to(tmp_path / "open")
        with pytest.raises(NotADirectoryError):
            private_dir(tmp_path / "dirlink")
    finally:
        os.umask(old)


def _fill(directory: Path, lines: int, max_bytes: int = 1 << 20, keep: int = 3) -> None:
    log = RotatingLog(directory, max_bytes, keep)
    for i in range(lines):
        log.write("stdout", f"line {i:06d}".encode())
    log.close()


def test_read_logs_is_bounded_in_bytes_and_keeps_whole_lines(tmp_path: Path) -> None:
    _fill(tmp_path, 3000, max_bytes=16 << 10)  # ~35 bytes a line: rotated files
    every = read_logs(tmp_path, tail=0, max_bytes=1 << 30)
    for bound in (1, 35, 1000, 20_000, 40_000):
        got = read_logs(tmp_path, tail=0, max_bytes=bound)
        assert len("\n".join(got).encode()) <= bound
        assert got == (every[-len(got):] if got else [])
        assert all(line.startswith("20") and " stdout line " in line for line in got)
    assert read_logs(tmp_path, tail=2, max_bytes=1 << 30) == every[-2:]
    assert read_logs(tmp_path, tail=5000, max_bytes=1 << 30) == every


def test_read_logs_refuses_links_and_odd_files(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("host secret\n")
    logs = tmp_path / "logs"
    _fill(logs, 3)
    (logs / f"{LOG_NAME}.1").symlink_to(secret)
    with pytest.raises(ContainerError, match="refused"):
        read_logs(logs)
    (logs / f"{LOG_NAME}.1").unlink()
    os.mkfifo(logs / f"{LOG_NAME}.2")
    with pytest.raises(ContainerError, match="not a regular file"):
        read_logs(logs)
    (logs / f"{LOG_NAME}.2").unlink()
    (tmp_path / "link").symlink_to(logs)
    with pytest.raises(ContainerError, match="refused"):
        read_logs(tmp_path, beneath=["link"])
    assert len(read_logs(tmp_path, beneath=["logs"])) == 3


def test_runtime_refuses_container_ids_that_are_paths(tmp_path: Path) -> None:
    runtime = ContainerRuntime(tmp_path)
    for bad in ("a/../b", "..", "", "a\x00", "/etc", "a/b"):
        with pytest.raises(ContainerError, match="invalid container id"):
            runtime.dir(bad)
        with pytest.raises(ContainerError):
            runtime.logs(bad)
