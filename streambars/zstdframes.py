"""Reading files of one or more zstd frames (DBN files, the live raw archive).

:class:`FrameReader` yields decompressed pieces as they come, marking where each frame
ends in the file; after the last piece, :attr:`FrameReader.cut_off` says whether the file
ended inside a frame. A frame corrupt in the middle raises ``zstandard.ZstdError``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, BinaryIO

import zstandard

READ_SIZE = 1 << 17
MAGIC = b"\x28\xb5\x2f\xfd"


class FrameReader:
    """Decompress ``f`` (from its current position) frame after frame."""

    def __init__(self, f: BinaryIO, read_size: int = READ_SIZE):
        self.f, self.read_size = f, read_size
        self.cut_off = False

    def pieces(self) -> Iterator[tuple[bytes, int | None]]:
        """(decompressed bytes, file offset where a frame ended after them, else None)."""
        dctx = zstandard.ZstdDecompressor()
        dobj = dctx.decompressobj()
        offset = 0  # bytes of the file consumed
        in_frame = False
        while True:
            buf = self.f.read(self.read_size)
            if not buf:
                self.cut_off = in_frame
                return
            while buf:
                in_frame = True
                out = dobj.decompress(buf)
                if dobj.eof:
                    offset += len(buf) - len(dobj.unused_data)
                    yield out, offset
                    buf = dobj.unused_data
                    dobj = dctx.decompressobj()
                    in_frame = False
                else:
                    offset += len(buf)
                    if out:
                        yield out, None
                    buf = b""

    def frames(self) -> Iterator[tuple[int, bytes]]:
        """(end offset, payload) of each complete frame; stops quietly at one cut off."""
        pending: list[bytes] = []
        for out, end in self.pieces():
            if out:
                pending.append(out)
            if end is not None:
                yield end, b"".join(pending)
                pending = []


SKIPPABLE = 0x184D2A50  # skippable frames: magic 0x184D2A5? (low 4 bits free), 4-byte size
_FRAME = int.from_bytes(MAGIC, "little")
_DICT_ID_BYTES = (0, 1, 2, 4)
_CONTENT_SIZE_BYTES = (0, 2, 4, 8)  # by Frame_Content_Size_flag; flag 0 + single segment: 1


def ends_inside_frame(path: str | os.PathLike[str]) -> bool:
    """Whether the zstd file at ``path`` ends inside a frame (cut off), from its frame and
    block headers alone (RFC 8878 sections 3.1.1-3.1.2: sizes are walked, nothing is
    decompressed; ~6.5k headers read for a year of 1s bars, ~19 ms). For a reader that
    decompresses with ``stream_reader``, which stops quietly where a truncated file ends.
    Bytes that are no frame at all raise ``zstandard.ZstdError`` as decompressing them would."""
    with open(path, "rb") as f:
        fd = f.fileno()
        return _walk(_Headers(fd), os.fstat(fd).st_size)


class _Headers:
    """``data[a:b]`` / ``data[i]`` of a file through pread, a small window at a time: the
    walk reads a few bytes every ~25 kB (mapping the file instead cost ~25 us a page fault)."""

    def __init__(self, fd: int):
        self.fd, self.base, self.buf = fd, 0, b""

    def _at(self, i: int, k: int) -> bytes:
        if not (self.base <= i and i + k <= self.base + len(self.buf)):
            self.base, self.buf = i, os.pread(self.fd, 64, i)
        return self.buf[i - self.base:i - self.base + k]

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            return self._at(key.start, key.stop - key.start)
        return self._at(key, 1)[0]


def _walk(data: Any, n: int) -> bool:
    pos = 0
    while pos < n:
        if n - pos < 4:
            return True
        magic = int.from_bytes(data[pos:pos + 4], "little")
        if magic & 0xFFFFFFF0 == SKIPPABLE:
            if n - pos < 8:
                return True
            pos += 8 + int.from_bytes(data[pos + 4:pos + 8], "little")
            if pos > n:
                return True
            continue
        if magic != _FRAME:
            raise zstandard.ZstdError(f"no zstd frame at byte {pos}")
        if n - pos < 5:
            return True
        fhd = data[pos + 4]
        single = (fhd >> 5) & 1
        fcs = _CONTENT_SIZE_BYTES[fhd >> 6] or single
        pos += 5 + (1 - single) + _DICT_ID_BYTES[fhd & 3] + fcs
        while True:
            if pos + 3 > n:
                return True
            head = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
            kind = (head >> 1) & 3
            if kind == 3:
                raise zstandard.ZstdError(f"reserved block type at byte {pos}")
            pos += 3 + (1 if kind == 1 else head >> 3)
            if pos > n:
                return True
            if head & 1:  # the frame's last block
                break
        pos += 4 * ((fhd >> 2) & 1)  # content checksum
        if pos > n:
            return True
    return False
