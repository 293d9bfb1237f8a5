"""Replication terms: every promotion starts a new term, stored durably next to the index.

A node keeps, in `<index dir>/replication-term` (written to a temporary file, fsynced and
renamed, then the directory fsynced):

- `term`: the highest term it has seen. It never goes down. A replica refuses to follow or
  confirm for a primary of a lower term; a primary that sees a higher one stops writing.
- `primary_term`: the term in which this node was promoted (0: never). A node accepts
  writes only while `primary_term == term`.
- `log_term`: the term of the primary whose log this node's files are a prefix of (set when
  it was promoted, or when a replica finished agreeing with a primary of that term). Votes
  compare it first, then positions: the candidate with the older log loses.
- `voted_for`: who got this node's vote in `term` (one vote per term).
- `seq_floor`: per sequential namespace, the first key the primary of `term` may hand out
  (see docs/zdb-replication.md, "Sequential namespaces after a failover").
- `generations`: per namespace, which rewrite of its log this node's files hold, as
  `[generation, file id, offset]`: the primary counts every compaction or FLUSH of a
  namespace (a new generation), and the files of that generation hold everything written
  before the rewrite once they reach its end (file id, offset). Votes compare positions
  only within one generation (see role.py); a replica adopts the primary's generation
  with the rewritten files (or with the settings the primary sends when it connects).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from zerostack.zdb.engine.raw import START, Position

TERM_FILE = "replication-term"
MAX_TERM = (1 << 62)


class TermError(Exception):
    """The term file cannot be read or written."""


class TermState(BaseModel):
    """What the term file holds (see the module docstring)."""

    term: int = Field(default=0, ge=0, le=MAX_TERM)
    primary_term: int = Field(default=0, ge=0, le=MAX_TERM)
    log_term: int = Field(default=0, ge=0, le=MAX_TERM)
    voted_for: str = Field(default="", max_length=300)
    seq_floor: dict[str, int] = Field(default_factory=dict)
    generations: dict[str, tuple[int, int, int]] = Field(default_factory=dict)


class Terms:
    """The term file of one server, loaded at start and rewritten on every change."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / TERM_FILE
        self.fresh = not self.path.exists()
        if self.fresh:
            self.state = TermState()
        else:
            try:
                self.state = TermState.model_validate_json(self.path.read_bytes())
            except (OSError, ValidationError, ValueError) as exc:
                raise TermError(f"{self.path}: unreadable replication term file ({exc}); "
                                "restore it or remove it only if this node is to start "
                                "over as a replica") from exc

    @property
    def term(self) -> int:
        return self.state.term

    @property
    def is_primary_of_term(self) -> bool:
        return self.state.primary_term != 0 and self.state.primary_term == self.state.term

    def save(self) -> None:
        data = json.dumps(self.state.model_dump(), sort_keys=True).encode()
        tmp = self.path.with_name(TERM_FILE + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            raise TermError(f"cannot write {self.path}: {exc}") from exc
        self.fresh = False

    def see(self, term: int) -> bool:
        """Record a term seen from another node; True when it is newer than ours."""
        if term <= self.state.term:
            return False
        self.state.term = min(term, MAX_TERM)
        self.state.voted_for = ""
        self.save()
        return True

    def generation(self, name: str) -> tuple[int, Position]:
        """(generation, end of the rewrite) of namespace `name`'s files: (0, START) for a
        namespace never rewritten."""
        found = self.state.generations.get(name)
        if found is None:
            return 0, START
        return found[0], (found[1], found[2])

    def set_generation(self, name: str, generation: int, base: Position) -> None:
        """This node's files of namespace `name` are now of `generation`, rewritten up to
        `base`; written at once when it changed."""
        value = (generation, base[0], base[1])
        if self.state.generations.get(name, (0, *START)) == value:
            return
        self.state.generations[name] = value
        self.save()

    def become_primary(self, term: int, seq_floor: dict[str, int]) -> None:
        self.state.term = term
        self.state.primary_term = term
        self.state.log_term = term
        self.state.seq_floor = dict(seq_floor)
        self.save()

    def follow(self, term: int) -> None:
        """Our files now agree with (are a prefix of) the log of the primary of `term`."""
        changed = False
        if term > self.state.term:
            self.state.term = term
            self.state.voted_for = ""
            changed = True
        if self.state.log_term != term:
            self.state.log_term = term
            changed = True
        if changed:
            self.save()
