"""What a primary sends to its replicas on a replication link: RESP arrays of bulk strings.

NS name mode password maxsize public worm locked frozen generation fileid offset
                                          settings (creates the namespace), and the
                                          generation of its log (see terms.py): how many
                                          times it was rewritten, and where the last
                                          rewrite ended
DROP name                                 the namespace was deleted
RESET name fileid offset generation       flushed or compacted: start over; the rewritten
                                          files end there and are of that generation
JUMP name fileid                          the primary started file pair N
DATA name fileid offset entries           raw data entries from that position
LAG bytes milliseconds                    how far behind the primary sees it
The replica answers with `REPLACK term name generation fileid offset ...` after applying
and writing out; a confirmation of another generation than the primary's counts for
nothing (it was sent before the replica read a RESET).
"""

from __future__ import annotations

from zerostack.zdb.protocol import encode_request

NS = b"NS"
DROP = b"DROP"
RESET = b"RESET"
JUMP = b"JUMP"
DATA = b"DATA"
LAG = b"LAG"


def frame(*args: bytes | str | int) -> bytes:
    return encode_request(*args)


def data_frame(name: bytes, fid: int, off: int, chunk: bytes) -> tuple[bytes, bytes, bytes]:
    """A DATA frame as three parts for transport.writelines(): the chunk is never copied."""
    fid_b, off_b = b"%d" % fid, b"%d" % off
    head = b"*5\r\n$4\r\nDATA\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n" % (
        len(name), name, len(fid_b), fid_b, len(off_b), off_b, len(chunk))
    return head, chunk, b"\r\n"
