import math

import numpy as np
import pytest
from PIL import Image

from storage.image_policy import ImagePolicy, target_grid


@pytest.mark.parametrize("patch,lo,hi", [(16, 64, 256), (14, 16, 1024), (16, 256, 256), (8, 1, 4096)])
def test_grid_properties_on_random_sizes(patch, lo, hi):
    rng = np.random.default_rng(0)
    sizes = np.exp(rng.uniform(np.log(4), np.log(5000), size=(2000, 2))).astype(int)
    for h, w in sizes:
        gh, gw = target_grid(int(h), int(w), patch, lo, hi)
        assert gh >= 1 and gw >= 1
        assert lo <= gh * gw <= hi, (h, w, gh, gw)
        # deterministic
        assert (gh, gw) == target_grid(int(h), int(w), patch, lo, hi)
        # aspect kept as well as integer sides allow (skip extremely elongated images that hit the 1-patch floor)
        if min(gh, gw) >= 4 and lo < hi:
            assert abs(math.log((gh / gw) / (h / w))) < 0.35


def test_sizes_already_in_range_are_kept():
    assert target_grid(224, 224, 16, 64, 256) == (14, 14)
    assert target_grid(160, 240, 16, 64, 256) == (10, 15)


def test_large_and_small_images_are_clamped():
    gh, gw = target_grid(4000, 3000, 16, 64, 256)
    assert gh * gw <= 256 and gh > gw
    gh, gw = target_grid(20, 20, 16, 64, 256)
    assert gh * gw >= 64 and gh == gw


def test_bad_policy_is_rejected():
    with pytest.raises(ValueError):
        target_grid(0, 10, 16, 64, 256)
    with pytest.raises(ValueError):
        target_grid(10, 10, 16, 300, 256)
    with pytest.raises(ValueError):
        ImagePolicy(format="gif")


def test_resize_encode_decode_roundtrip():
    policy = ImagePolicy(patch_size=16, min_tokens=16, max_tokens=64)
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 255, (300, 170, 3), dtype=np.uint8))
    out = policy.resize(img)
    gh, gw = policy.grid(300, 170)
    assert out.size == (gw * 16, gh * 16)
    decoded = ImagePolicy.decode(policy.encode(out))
    np.testing.assert_array_equal(decoded, np.asarray(out))  # PNG is lossless
    assert ImagePolicy.from_dict(policy.to_dict()) == policy
