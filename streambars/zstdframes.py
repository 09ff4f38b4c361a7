"""Reading files of one or more zstd frames (DBN files, the live raw archive).

:class:`FrameReader` yields decompressed pieces as they come, marking where each frame
ends in the file; after the last piece, :attr:`FrameReader.cut_off` says whether the file
ended inside a frame. A frame corrupt in the middle raises ``zstandard.ZstdError``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

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
