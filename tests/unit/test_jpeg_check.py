"""The structural JPEG check never passes a file the decoder rejects, and the gate's verdict
(structure first, decode when in doubt) equals a full decode's on seeded corruptions."""

from __future__ import annotations

import io
import random
import warnings

import numpy as np
import pytest
from PIL import Image

from components.common.coco_panoptic import check_image_decodes
from components.common.jpeg_check import JpegStructureError, check_jpeg_structure
from components.common.validation import image_decodable_size


def _picture(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * 3 + y) % 256, (y * 2) % 256, (x + y * 5) % 256], -1).astype(np.float32)
    return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)


def _variants() -> list[bytes]:
    out = []
    options = [{}, {"progressive": True}, {"optimize": True}, {"restart_marker_blocks": 3},
               {"subsampling": 0}, {"subsampling": 1}, {"quality": 30}, {"exif": b"Exif\x00\x00" + bytes(40)}]
    for k, kw in enumerate(options):
        im = Image.fromarray(_picture(61 + 7 * k, 83 + 5 * k, k))
        for mode in ("RGB", "L", "CMYK"):
            if mode != "RGB" and k > 2:
                continue
            buf = io.BytesIO()
            im.convert(mode).save(buf, format="JPEG", **{"quality": 85, **kw})
            out.append(buf.getvalue())
    return out


def _decodes(data: bytes):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return check_image_decodes(data)
    except ValueError:
        return None


def _mutate(rng: random.Random, data: bytes) -> bytes:
    d = bytearray(data)
    n = len(d)
    kind = rng.randrange(7)
    if kind == 0:  # truncation
        d = d[:rng.randrange(n)]
    elif kind == 1:  # bytes overwritten in the headers
        for _ in range(rng.randint(1, 4)):
            d[rng.randrange(min(n, 700))] = rng.randrange(256)
    elif kind == 2:  # bytes overwritten anywhere
        for _ in range(rng.randint(1, 16)):
            d[rng.randrange(n)] = rng.randrange(256)
    elif kind == 3:  # one bit flipped
        d[rng.randrange(n)] ^= 1 << rng.randrange(8)
    elif kind == 4:  # a zeroed stretch
        a = rng.randrange(n)
        b = min(n, a + rng.randint(1, 2000))
        d[a:b] = bytes(b - a)
    elif kind == 5:  # random bytes inserted
        a = rng.randrange(n)
        d[a:a] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))
    else:  # a stretch deleted
        a = rng.randrange(n)
        del d[a:a + rng.randint(1, 40)]
    return bytes(d)


def test_good_files_pass_with_the_decoders_size():
    for data in _variants():
        assert check_jpeg_structure(data) == _decodes(data)


def test_structure_never_passes_what_the_decoder_rejects():
    rng = random.Random(1234)
    files = _variants()
    passed = rejected = doubted_but_decodes = 0
    for _ in range(2500):
        data = _mutate(rng, rng.choice(files))
        decoded = _decodes(data)
        try:
            size = check_jpeg_structure(data)
        except JpegStructureError:
            size = None
            doubted_but_decodes += decoded is not None
        if size is not None:
            passed += 1
            assert decoded == size, "the structural check passed a file the decoder rejects"
        else:
            rejected += 1
        # the gate's verdict is the decoder's
        try:
            gate = image_decodable_size(data, "x.jpg")
        except ValueError:
            gate = None
        assert gate == decoded
    # the fuzz exercised both sides, and most doubted files really are broken
    assert passed > 500 and rejected > 500
    assert doubted_but_decodes < rejected / 4
    print(f"passed {passed}, doubted {rejected} (of which the decoder accepts {doubted_but_decodes})")


@pytest.mark.parametrize("cut,words", [(0.5, "truncated"), (0.999, "truncated")])
def test_truncated_file_is_named_as_such(cut, words):
    data = _variants()[0]
    with pytest.raises(JpegStructureError, match=words):
        check_jpeg_structure(data[: int(len(data) * cut)])


def test_other_formats_go_to_the_decoder():
    buf = io.BytesIO()
    Image.fromarray(_picture(20, 30, 0)).save(buf, format="PNG")
    with pytest.raises(JpegStructureError, match="not a JPEG"):
        check_jpeg_structure(buf.getvalue())
    assert image_decodable_size(buf.getvalue(), "x.png") == (20, 30)
    with pytest.raises(ValueError, match="x.bin: cannot decode image"):
        image_decodable_size(b"\x00" * 100, "x.bin")
