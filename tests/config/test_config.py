import pytest

from config import ConfigError, dump_toml, load_config, parse_overrides
from stages.config import CacheConfig


def test_toml_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('teacher = "timm:efficientnet_lite0"\nmax_tokens = 128\nworkers = 2\n')
    cfg = load_config(CacheConfig, path, ["max_tokens=196", "dtype=float32"])
    assert cfg.teacher == "timm:efficientnet_lite0"
    assert cfg.max_tokens == 196 and cfg.workers == 2 and cfg.dtype == "float32"


def test_unknown_key_is_named(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('teacher = "timm:x"\nmax_tokenz = 3\n')
    with pytest.raises(ConfigError, match="unknown key 'max_tokenz'"):
        load_config(CacheConfig, path)
    with pytest.raises(ConfigError, match="unknown key 'wrkers'"):
        load_config(CacheConfig, None, {"teacher": "timm:x", "wrkers": 1})


@pytest.mark.parametrize(
    "override, key",
    [("dtype=bfloat16", "dtype"), ("workers=0", "workers"), ("max_tokens=lots", "max_tokens"), ("image_quality=101", "image_quality")],
)
def test_bad_value_is_named(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(CacheConfig, None, ["teacher=timm:x", override])


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="min_tokens"):
        load_config(CacheConfig, None, {"teacher": "t", "min_tokens": 300, "max_tokens": 100})
    with pytest.raises(ConfigError, match="teacher name"):
        load_config(CacheConfig, None, {"teacher": "t", "name": "../escape"})


def test_missing_required_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="'teacher'"):
        load_config(CacheConfig, None, {})
    with pytest.raises(ConfigError, match="not found"):
        load_config(CacheConfig, tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("teacher = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(CacheConfig, bad)


def test_parse_overrides_types_and_nesting():
    out = parse_overrides(["a.b=3", "a.c=true", "d=[1, 2]", "e=hello", "f=1e-3"])
    assert out == {"a": {"b": 3, "c": True}, "d": [1, 2], "e": "hello", "f": 1e-3}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])


def test_dump_roundtrip(tmp_path):
    cfg = load_config(CacheConfig, None, {"teacher": "timm:m", "max_tokens": 100, "workers": 3})
    path = tmp_path / "resolved.toml"
    path.write_text(dump_toml(cfg))
    assert load_config(CacheConfig, path) == cfg
