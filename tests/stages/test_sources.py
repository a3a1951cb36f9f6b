import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from stages.sources import BACKGROUND, DecodeError, ImageRef, decode_rgb, image_id, iter_bytes, list_images, read_bytes


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _photo() -> Image.Image:
    from skimage import data

    return Image.fromarray(data.chelsea()).resize((96, 64))


def test_rgb_l_and_bilevel():
    rgb = _photo()
    np.testing.assert_array_equal(np.asarray(decode_rgb(_png(rgb))), np.asarray(rgb))
    gray = rgb.convert("L")
    out = np.asarray(decode_rgb(_png(gray)))
    assert out.shape == (64, 96, 3) and (out[..., 0] == np.asarray(gray)).all() and (out[..., 1] == out[..., 2]).all()
    bw = Image.fromarray((np.arange(64 * 96).reshape(64, 96) % 2).astype(bool))
    out = np.asarray(decode_rgb(_png(bw)))
    assert set(np.unique(out)) <= {0, 255}


def test_16bit_is_scaled_not_clipped():
    arr = np.array([[0, 32768, 65535, 257]], dtype=np.uint16)
    out = np.asarray(decode_rgb(_png(Image.fromarray(arr))))[0, :, 0]
    np.testing.assert_array_equal(out, [0, 128, 255, 1])


def test_alpha_is_composited_over_background():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red
    rgba[0, 1] = (255, 0, 0, 0)  # fully transparent: background shows
    rgba[1, 0] = (0, 0, 255, 128)  # half
    out = np.asarray(decode_rgb(_png(Image.fromarray(rgba, "RGBA"))))
    assert tuple(out[0, 0]) == (255, 0, 0)
    assert tuple(out[0, 1]) == BACKGROUND
    assert abs(int(out[1, 0, 2]) - (255 * 128 + BACKGROUND[2] * 127) // 255) <= 1
    la = Image.fromarray(np.array([[[200, 0], [200, 255]]], np.uint8), "LA")
    out = np.asarray(decode_rgb(_png(la)))
    assert tuple(out[0, 0]) == BACKGROUND and tuple(out[0, 1]) == (200, 200, 200)


def test_palette_with_and_without_transparency_and_cmyk():
    p = _photo().convert("P")
    np.testing.assert_array_equal(np.asarray(decode_rgb(_png(p))), np.asarray(p.convert("RGB")))
    pt = Image.new("P", (4, 4), 0)
    pt.putpalette([255, 0, 0] + [0, 255, 0] * 255)
    pt.info["transparency"] = 0
    out = np.asarray(decode_rgb(_png(pt, transparency=0)))
    assert tuple(out[0, 0]) == BACKGROUND
    cmyk = _photo().convert("CMYK")
    buf = io.BytesIO()
    cmyk.save(buf, format="JPEG")
    assert decode_rgb(buf.getvalue()).mode == "RGB"


def test_exif_orientation_and_first_frame():
    img = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert decode_rgb(buf.getvalue()).size == (20, 40)
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    assert tuple(np.asarray(decode_rgb(buf.getvalue()))[0, 0]) == (255, 0, 0)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"hello, not an image\n" * 5, "not-an-image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, None),
    ],
)
def test_bad_bytes(data, reason):
    with pytest.raises(DecodeError) as err:
        decode_rgb(data)
    if reason:
        assert err.value.reason == reason
    assert " at 0x" not in err.value.reason


@pytest.mark.parametrize("encode", [_png, _jpeg])
def test_truncated_files_fail(encode):
    data = encode(_photo())
    with pytest.raises(DecodeError) as err:
        decode_rgb(data[: len(data) // 2])
    assert err.value.reason in ("truncated",) or err.value.reason.startswith("corrupt")


def test_decompression_bomb():
    data = _png(Image.new("L", (300, 300)))
    with pytest.raises(DecodeError, match="too-large"):
        decode_rgb(data, max_pixels=100 * 100)


def test_listing_folder_list_and_tars(tmp_path):
    img = _png(_photo())
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "x.png").write_bytes(img)
    (tmp_path / "a" / "b" / "y.PNG").write_bytes(img)
    (tmp_path / "a" / "notes.txt").write_text("skip me")
    refs = list_images(tmp_path / "a")
    assert [r.source for r in refs] == [str(tmp_path / "a" / "b" / "y.PNG"), str(tmp_path / "a" / "x.png")]
    listing = tmp_path / "list.txt"
    listing.write_text("# comment\na/x.png\n\n" + str(tmp_path / "a" / "notes.txt") + "\n")
    refs = list_images(listing)
    assert [r.source for r in refs] == [str(tmp_path / "a" / "x.png"), str(tmp_path / "a" / "notes.txt")]
    for k in range(3):
        with tarfile.open(tmp_path / f"shard-{k:03d}.tar", "w") as tar:
            for name, payload in ((f"{k}_0.png", img), (f"{k}_0.cls", b"3"), (f"{k}_1.jpg", b"broken")):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    refs = list_images(str(tmp_path / "shard-{000..002}.tar"))
    assert len(refs) == 6 and refs[0].source.endswith("shard-000.tar::0_0.png")
    assert list_images(str(tmp_path / "shard-*.tar")) == refs
    assert len(list_images(tmp_path / "shard-001.tar")) == 2
    got = list(iter_bytes(refs))
    assert [r for r, _ in got] == refs and got[0][1] == img and read_bytes(refs[0]) == img
    with pytest.raises(DecodeError):
        decode_rgb(got[1][1])
    assert image_id(img) == image_id(bytes(img)) and len(image_id(img)) == 32 and image_id(img) != image_id(b"x")


def test_bad_specs(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        list_images(tmp_path / "empty")
    with pytest.raises(ValueError, match="no files match"):
        list_images(str(tmp_path / "nothing-{000..002}.tar"))
    missing = list(iter_bytes([ImageRef(str(tmp_path / "gone.png"))]))
    assert isinstance(missing[0][1], OSError)
