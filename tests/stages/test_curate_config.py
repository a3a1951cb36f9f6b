"""`pipeline curate` inputs: typed config and clear errors before any work starts."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from config import ConfigError, load_config
from stages.config import CurateConfig

TINY = "timm:vit_small_patch16_dinov3,depth=2,embed_dim=48,num_heads=2"


def test_levels_from_text_toml_and_validation(tmp_path):
    cfg = load_config(CurateConfig, None, {"embedder": TINY, "levels": "100, 10,2", "target": 5})
    assert cfg.levels == [100, 10, 2] and cfg.selection == "random" and cfg.unit_images == 1024
    toml = tmp_path / "c.toml"
    toml.write_text('embedder = "timm:efficientnet_lite0"\nlevels = [50, 5]\ntarget = 20\nfit_sample = 1000\n')
    cfg = load_config(CurateConfig, toml, ["selection=closest"])
    assert cfg.levels == [50, 5] and cfg.fit_sample == 1000 and cfg.selection == "closest"
    for levels, msg in (([10, 20], "strictly decreasing"), ([10, 10], "strictly decreasing"), ([], "at least one"),
                        ([5, 0], "positive"), ("a,b", "comma-separated")):
        with pytest.raises(ConfigError, match=msg):
            load_config(CurateConfig, None, {"embedder": TINY, "levels": levels, "target": 5})
    with pytest.raises(ConfigError, match="target"):
        load_config(CurateConfig, None, {"embedder": TINY, "levels": [2], "target": 0})
    with pytest.raises(ConfigError, match="unknown key 'level'"):
        load_config(CurateConfig, None, {"embedder": TINY, "levels": [2], "target": 1, "level": 3})
    with pytest.raises(ConfigError, match="selection"):
        load_config(CurateConfig, None, {"embedder": TINY, "levels": [2], "target": 1, "selection": "far"})


def _images(tmp_path, n=5):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (40 + i, 40), (10 * i, 20, 30)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("extra, message", [
    (["--levels", "2,4", "--target", "2"], "strictly decreasing"),
    (["--levels", "2", "--target", "9"], "exceeds the pool: 5 images"),
    (["--levels", "8,2", "--target", "3"], "level 1 asks for 8 clusters"),
    (["--levels", "2", "--target", "3", "--fit-sample", "1"], "level 1 asks for 2 clusters"),
    (["--levels", "2", "--target", "3", "--selection", "far"], "selection"),
])
def test_bad_input_is_refused_before_any_work(tmp_path, extra, message):
    folder = _images(tmp_path)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["curate", str(folder), "--out", str(out), "--embedder", TINY,
                                      "--random-init", *extra])
    assert result.exit_code != 0
    assert message in " ".join(result.output.split()), result.output
    assert not out.exists()


def test_unknown_embedder_and_missing_images(tmp_path):
    folder = _images(tmp_path)
    result = CliRunner().invoke(app, ["curate", str(folder), "--out", str(tmp_path / "run"),
                                      "--embedder", "timm:no_such_model", "--levels", "2", "--target", "2"])
    assert result.exit_code == 2 and "unknown timm model" in result.output
    result = CliRunner().invoke(app, ["curate", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"),
                                      "--embedder", TINY, "--levels", "2", "--target", "2"])
    assert result.exit_code == 2 and "IMAGES not found" in result.output


def test_help_names_the_options():
    result = CliRunner().invoke(app, ["curate", "--help"])
    assert result.exit_code == 0
    for option in ("--out", "--embedder", "--levels", "--target", "--fit-sample", "--selection", "--concepts",
                   "--ray-address", "--set"):
        assert option in result.output
    assert "curate" in CliRunner().invoke(app, ["--help"]).output
