"""zstdframes.ends_inside_frame: a file cut anywhere is told from one that ends on a frame
boundary by its headers alone, exactly as decompressing it frame by frame tells
(FrameReader.cut_off, the reference), for every cut of files of several frame kinds."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import zstandard

from streambars.zstdframes import FrameReader, _walk, ends_inside_frame


def _cut_off_by_decompressing(blob: bytes) -> bool:
    reader = FrameReader(io.BytesIO(blob), 997)  # odd reads: headers split across reads
    for _ in reader.pieces():
        pass
    return reader.cut_off


def _files() -> dict[str, bytes]:
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 40, 300_000, dtype=np.uint8).tobytes()  # several 128 kB blocks
    skip = (0x184D2A5E).to_bytes(4, "little") + (6).to_bytes(4, "little") + b"skip!!"
    out = {}
    for name, opts in {"plain": {}, "checksum": {"write_checksum": True},
                       "no size": {"write_content_size": False}, "level 19": {"level": 19}}.items():
        c = zstandard.ZstdCompressor(**opts)
        out[name] = c.compress(raw)
        out[name + ", frames"] = c.compress(raw[:5000]) + c.compress(b"") + c.compress(raw)
    out["skippable frames"] = skip + out["plain"] + skip
    out["raw and rle blocks"] = zstandard.ZstdCompressor(level=1).compress(bytes(200_000) + rng.bytes(150_000))
    return out


@pytest.mark.parametrize("name", list(_files()))
def test_every_cut_is_told_as_decompressing_tells_it(name: str) -> None:
    blob = _files()[name]
    assert _walk(blob, len(blob)) is False
    rng = np.random.default_rng(len(blob))
    # every cut near the start, the frame boundaries and the end; a sample elsewhere
    cuts = set(range(0, 120)) | set(range(len(blob) - 120, len(blob) + 1))
    cuts |= set(rng.integers(0, len(blob), 200).tolist())
    disagree = [k for k in sorted(cuts) if _walk(blob[:k], k) != _cut_off_by_decompressing(blob[:k])]
    assert disagree == []
    assert any(_walk(blob[:k], k) for k in cuts)  # cuts inside frames exist and are seen


def test_a_file_and_no_frame(tmp_path: Path) -> None:
    good = tmp_path / "good.zst"
    good.write_bytes(_files()["plain, frames"])
    assert ends_inside_frame(good) is False
    cut = tmp_path / "cut.zst"
    cut.write_bytes(good.read_bytes()[:-7])
    assert ends_inside_frame(cut) is True
    empty = tmp_path / "empty.zst"
    empty.write_bytes(b"")
    assert ends_inside_frame(empty) is False
    junk = tmp_path / "junk.zst"
    junk.write_bytes(good.read_bytes() + b"not a frame at all")
    with pytest.raises(zstandard.ZstdError, match="no zstd frame"):
        ends_inside_frame(junk)
