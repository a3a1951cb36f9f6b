import hashlib
import io
import tarfile

import numpy as np
import pytest
from PIL import Image, ImageFile

import stages.sources as sources
from stages.sources import (
    BACKGROUND,
    DecodeError,
    ImageRef,
    decode_rgb,
    image_id,
    iter_bytes,
    list_images,
    read_bytes,
    register_spec_reader,
)


def _enc(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _photo() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.chelsea()).resize((96, 64))


def _rgb(data: bytes) -> np.ndarray:
    img = decode_rgb(data)
    assert img.mode == "RGB"
    return np.asarray(img)


def _gray(values) -> np.ndarray:
    """The expected RGB of a gray row: the value repeated in each channel."""
    return np.repeat(np.asarray(values, np.uint8)[None, :, None], 3, axis=2)


# ----------------------------------------------------------------------------- modes
def test_rgb_l_and_bilevel_exact():
    rgb = _photo()
    np.testing.assert_array_equal(_rgb(_enc(rgb)), np.asarray(rgb))
    gray = rgb.convert("L")
    np.testing.assert_array_equal(_rgb(_enc(gray)), np.repeat(np.asarray(gray)[..., None], 3, axis=2))
    bits = np.arange(6 * 7).reshape(6, 7) % 3 == 0
    for fmt in ("PNG", "PPM", "TIFF"):  # PPM writes .pbm for mode 1
        out = _rgb(_enc(Image.fromarray(bits), fmt))
        np.testing.assert_array_equal(out, np.repeat(np.where(bits, 255, 0).astype(np.uint8)[..., None], 3, axis=2))


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_is_scaled_not_clipped(fmt):
    arr = np.array([[0, 32768, 65535, 257, 1000]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert Image.open(io.BytesIO(_enc(img, fmt))).mode.startswith("I;16")
    np.testing.assert_array_equal(_rgb(_enc(img, fmt)), _gray([0, 128, 255, 1, 4]))  # v / 257, rounded


def test_16bit_pgm_decodes_as_mode_i_and_is_scaled():
    raw = np.array([0, 32768, 65535, 25700], ">u2").tobytes()
    data = b"P5\n4 1\n65535\n" + raw
    assert Image.open(io.BytesIO(data)).mode == "I"
    np.testing.assert_array_equal(_rgb(data), _gray([0, 128, 255, 100]))


def test_32bit_int_and_float_modes():
    i32 = Image.fromarray(np.array([[-1000, 0, 1000, 3000]], np.int32))  # no 16-bit range: min-max
    np.testing.assert_array_equal(_rgb(_enc(i32, "TIFF")), _gray(np.rint(np.array([0, 1000, 2000, 4000]) / 4000 * 255)))
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0, 0.25]], np.float32))  # [0, 1]: x 255
    np.testing.assert_array_equal(_rgb(_enc(unit, "TIFF")), _gray([0, 128, 255, 64]))
    wide = Image.fromarray(np.array([[-2.0, 0.0, 2.0, np.nan]], np.float32))  # min-max, NaN -> min
    np.testing.assert_array_equal(_rgb(_enc(wide, "TIFF")), _gray([0, 128, 255, 0]))


def test_alpha_is_composited_over_background():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (255, 0, 0, 0)  # fully transparent: background shows
    rgba[1, 0] = (0, 0, 255, 128)  # half
    rgba[1, 1] = (10, 20, 30, 255)
    out = _rgb(_enc(Image.fromarray(rgba, "RGBA")))
    a = rgba[..., 3:].astype(np.float64) / 255
    expected = np.rint(rgba[..., :3] * a + np.array(BACKGROUND) * (1 - a))  # float64 reference
    np.testing.assert_allclose(out, expected, atol=1)
    assert tuple(out[0, 1]) == BACKGROUND and tuple(out[0, 0]) == (255, 0, 0)
    la = Image.fromarray(np.array([[[200, 0], [200, 255]]], np.uint8), "LA")
    out = _rgb(_enc(la))
    assert tuple(out[0, 0]) == BACKGROUND and tuple(out[0, 1]) == (200, 200, 200)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_and_without_transparency(fmt):
    p = _photo().quantize(64)
    np.testing.assert_array_equal(_rgb(_enc(p, fmt)), np.asarray(p.convert("RGB")))
    pt = Image.new("P", (4, 2), 0)
    pt.putpalette([255, 0, 0, 0, 255, 0] + [0, 0, 0] * 254)
    pt.paste(1, (2, 0, 4, 2))
    out = _rgb(_enc(pt, fmt, transparency=0))
    assert (out[:, :2] == BACKGROUND).all() and (out[:, 2:] == (0, 255, 0)).all()


def test_cmyk():
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # no cyan, full magenta+yellow: red
    assert (_rgb(_enc(cmyk, "TIFF")) == (255, 0, 0)).all()
    assert (np.abs(_rgb(_enc(cmyk, "JPEG", quality=100)).astype(int) - (255, 0, 0)) <= 2).all()


def test_exif_orientation_is_applied():
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red
    arr[:5, :, 1] = 255  # top rows yellow/green: breaks every symmetry
    exif = Image.Exif()
    exif[0x0112] = 6  # display = stored rotated 90 degrees clockwise
    out = _rgb(_enc(Image.fromarray(arr), "PNG", exif=exif))
    np.testing.assert_array_equal(out, np.rot90(arr, k=-1))


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "PNG"])
def test_multi_frame_gives_first_frame(fmt):
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = _enc(frames[0], fmt, save_all=True, append_images=frames[1:])
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    assert (_rgb(data) == (255, 0, 0)).all()


# ----------------------------------------------------------------------------- failures
@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"hello, not an image\n" * 5, "not-an-image"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not-an-image"),  # no Ghostscript
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not-an-image"),  # a signature alone: no plugin accepts it
    ],
)
def test_bad_bytes(data, reason):
    with pytest.raises(DecodeError) as err:
        decode_rgb(data)
    assert err.value.reason == reason


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "TIFF", "BMP"])
def test_truncated_files_fail_even_if_pillow_is_told_to_pad(fmt, monkeypatch):
    img = _photo().convert("P") if fmt == "GIF" else _photo()
    data = _enc(img, fmt)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # someone else's setting
    with pytest.raises(DecodeError) as err:
        decode_rgb(data[: len(data) // 2])
    assert err.value.reason == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # restored, not overwritten
    assert decode_rgb(data).size == img.size


def test_truncated_files_fail_when_many_threads_decode(monkeypatch):
    """An actor decodes a unit on all its threads: one thread's restore of Pillow's setting must not switch
    padding back on under another thread's decode (per-call save and restore did, and a truncated PNG
    came back padded)."""
    from concurrent.futures import ThreadPoolExecutor

    data = _enc(_photo().resize((256, 256)), "PNG")
    truncated = [data[: len(data) * k // 40] for k in range(8, 36)] * 4
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)

    def reason(blob: bytes) -> str:
        try:
            decode_rgb(blob)
        except DecodeError as err:
            return err.reason
        return "decoded"

    for _ in range(3):
        with ThreadPoolExecutor(4) as pool:
            assert set(pool.map(reason, truncated)) == {"truncated"}
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_flipped_bytes_are_corrupt_not_truncated():
    data = bytearray(_enc(_photo()))
    data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)  # damage inside IDAT, length intact
    with pytest.raises(DecodeError) as err:
        decode_rgb(bytes(data))
    assert err.value.reason.startswith("corrupt: ")


def test_decompression_bomb(monkeypatch):
    data = _enc(Image.new("L", (300, 300)))
    with pytest.raises(DecodeError, match="too-large"):
        decode_rgb(data, max_pixels=100 * 100)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # Pillow's warning level: not a limit of ours
    assert decode_rgb(data, max_pixels=300 * 300).size == (300, 300)


# ----------------------------------------------------------------------------- listing
def _write_shard(path, members):
    with tarfile.open(path, "w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_folder_is_recursive_case_insensitive_and_sorted(tmp_path):
    img = _enc(_photo())
    names = ["b/z.JPG", "a.png", "b/c/y.webp", "A.TIFF", "b/notes.txt", "b/x.pgm", "d.json"]
    for name in names:  # written in an unsorted order
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(img)
    expected = sorted(tmp_path / n for n in names if not n.endswith((".txt", ".json")))
    assert [r.source for r in list_images(tmp_path)] == [str(p) for p in expected]
    assert list_images(str(tmp_path)) == list_images(tmp_path)
    assert list_images(tmp_path / "a.png") == [ImageRef(str(tmp_path / "a.png"))]


def test_list_file_keeps_every_entry(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "x.png").write_bytes(_enc(_photo()))
    (tmp_path / "imgs" / "fake.jpg").write_text("a text file named .jpg")
    listing = tmp_path / "lists" / "list.txt"
    listing.parent.mkdir()
    listing.write_text(f"# comment\n../imgs/x.png\n\n  ../imgs/fake.jpg  \n{tmp_path / 'notes.txt'}\n")
    refs = list_images(listing)
    assert [r.source for r in refs] == [
        str(listing.parent / "../imgs/x.png"),
        str(listing.parent / "../imgs/fake.jpg"),
        str(tmp_path / "notes.txt"),
    ]
    got = dict(iter_bytes(refs))
    assert decode_rgb(got[refs[0]]).size == (96, 64)
    with pytest.raises(DecodeError) as err:
        decode_rgb(got[refs[1]])
    assert err.value.reason == "not-an-image"
    assert isinstance(got[refs[2]], FileNotFoundError)  # missing file: an error value, not a crash


def test_tar_shards_brace_and_glob(tmp_path):
    img = _enc(_photo())
    for k in range(3):  # members deliberately not in name order
        members = [(f"{k}_z.png", img), (f"{k}_z.cls", b"3"), (f"{k}_a.jpg", b"broken"), (f"{k}_a.json", b"{}")]
        _write_shard(tmp_path / f"shard-{k:03d}.tar", members)
    refs = list_images(str(tmp_path / "shard-{000..002}.tar"))
    assert [r.source for r in refs] == [
        f"{tmp_path / f'shard-{k:03d}.tar'}::{k}_{m}" for k in range(3) for m in ("z.png", "a.jpg")
    ]
    assert list_images(str(tmp_path / "shard-*.tar")) == refs
    assert list_images(str(tmp_path / "shard-{002,000}.tar")) == refs[4:] + refs[:2]  # brace order kept
    assert list_images(tmp_path / "shard-001.tar") == refs[2:4]
    interleaved = [refs[0], refs[4], refs[1], refs[2], refs[0]]
    got = list(iter_bytes(interleaved))
    assert [r for r, _ in got] == interleaved
    assert [d for _, d in got] == [img, img, b"broken", img, img]
    assert read_bytes(refs[3]) == b"broken" and read_bytes(refs[0]) == img
    missing = ImageRef(f"{tmp_path / 'shard-000.tar'}::nope.png")
    assert isinstance(next(iter_bytes([missing]))[1], FileNotFoundError)
    with pytest.raises(FileNotFoundError):
        read_bytes(missing)


def test_image_id_is_sha256_prefix():
    data = _enc(_photo())
    assert image_id(data) == hashlib.sha256(data).hexdigest()[:32]
    assert image_id(data) != image_id(data + b"\x00")


def test_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(ValueError, match="no files match"):
        list_images(str(tmp_path / "nothing-{000..002}.tar"))
    (tmp_path / "bad.tar").write_bytes(b"not a tar at all" * 100)
    with pytest.raises(ValueError, match="cannot read tar"):
        list_images(tmp_path / "bad.tar")
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="path list"):
        list_images(tmp_path / "blob.bin")
    (tmp_path / "blank.txt").write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match="no images"):
        list_images(tmp_path / "blank.txt")


def test_registered_spec_reader_takes_precedence(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "_SPEC_READERS", [])
    manifest = tmp_path / "run.manifest"
    manifest.write_text("ignored")
    register_spec_reader(lambda p: p.suffix == ".manifest", lambda p: [ImageRef("from-manifest")])
    assert list_images(manifest) == [ImageRef("from-manifest")]
