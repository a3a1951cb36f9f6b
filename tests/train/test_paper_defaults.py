"""The README's "Defaults vs the papers" table and the code cannot drift: every ``target: key = value``
cell of its "ours" column is checked against the config it names."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from stages.config import CacheConfig, CurateConfig
from train.config import PRESETS, TrainConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def _cells() -> list[tuple[str, str, object]]:
    """(target, dotted key, value) for every assignment in the table's "ours" column."""
    table = README.read_text().split("<!-- paper-defaults:start -->")[1].split("<!-- paper-defaults:end -->")[0]
    out = []
    for row in table.splitlines():
        cols = [c.strip() for c in row.split("|")]
        if len(cols) < 6 or not cols[4].startswith("`"):
            continue
        for span in re.findall(r"`([^`]+)`", cols[4]):
            target, _, assignments = span.partition(":")
            for assignment in assignments.split(";"):
                key, _, value = assignment.partition("=")
                out.append((target.strip(), key.strip(), tomllib.loads(f"v = {value.strip()}")["v"]))
    return out


def _config(target: str):
    if target == "defaults":
        return TrainConfig()
    if target == "cache":
        return CacheConfig(teacher="timm:efficientnet_lite0")
    if target == "curate":
        return CurateConfig(embedder="timm:efficientnet_lite0", levels=[2, 1], target=1)
    assert target in PRESETS, f"the table names an unknown preset {target!r}"
    return TrainConfig.model_validate({"model": {"preset": target}})


CELLS = _cells()


def test_the_table_is_found_and_covers_every_paper_preset():
    assert len(CELLS) >= 40
    assert {t for t, _, _ in CELLS} >= {"defaults", "cache", "curate", "amoe", "m2ot-b", "tgr-ti", "tgr-s", "tgr-b"}


@pytest.mark.parametrize("target,key,value", CELLS, ids=[f"{t}:{k}" for t, k, _ in CELLS])
def test_the_code_holds_what_the_table_says(target, key, value):
    actual = _config(target)
    for part in key.split("."):
        actual = getattr(actual, part)
    if isinstance(actual, tuple):
        actual = list(actual)
    if isinstance(value, float):
        assert actual == pytest.approx(value, rel=1e-12)
    else:
        assert actual == value


def test_the_tgr_widths_keep_their_deit_shapes():
    for name, (dim, heads) in {"tgr-ti": (192, 3), "tgr-s": (384, 6), "tgr-b": (768, 12)}.items():
        model = TrainConfig.model_validate({"model": {"preset": name}}).model
        assert (model.dim, model.num_heads, model.depth, model.hidden) == (dim, heads, 12, 4 * dim)
        assert model.moe_layer_ids() == [7, 9, 11]  # layers {8, 10, 12}, 1-based
