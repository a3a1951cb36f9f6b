"""docs/store-format.md, storage/layout.py and a store written by cache-teachers must agree.

The page is the contract other tools read: a name the code writes that the page does not list, a
name the page lists that the code spells differently, or another version number fails here.
"""

from __future__ import annotations

import re
from fnmatch import fnmatch
from pathlib import Path

import zarr

from storage import layout as L
from storage.store import FeatureStore

DOC = Path(__file__).resolve().parents[2] / "docs" / "store-format.md"


def _doc() -> str:
    return DOC.read_text()


def documented_paths() -> list[str]:
    """Paths of the tree block, ``<x>`` placeholders turned into ``*``, relative to the store root."""
    block = re.search(r"```\nstore/\n(.*?)```", _doc(), re.S).group(1)
    stack: list[tuple[int, str]] = []
    paths = []
    for line in block.splitlines():
        indent = len(line) - len(line.lstrip())
        if not line.strip() or indent > 8:  # deeper lines continue the description of the line above
            continue
        name = line.split()[0]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = "/".join([n for _, n in stack] + [name.rstrip("/")])
        paths.append(re.sub(r"<[^>]+>", "*", path))
        if name.endswith("/"):
            stack.append((indent, name.rstrip("/")))
    return paths


def documented_keys(heading: str) -> set[str]:
    """Backticked names in the first column of the table under ``heading``."""
    section = _doc().split(f"## {heading}", 1)[1].split("\n## ", 1)[0]
    keys = set()
    for row in section.splitlines():
        if row.startswith("| `"):
            keys |= set(re.findall(r"`([^`]+)`", row.split("|")[1]))
    return keys


def test_the_page_states_the_version_the_code_writes():
    assert re.search(r"^# The feature store format, version (\d+)$", _doc(), re.M).group(1) == str(L.FORMAT_VERSION)
    assert f"`format_version` | {L.FORMAT_VERSION} " in _doc()


def test_every_layout_name_is_on_the_page_where_the_code_puts_it():
    paths = set(documented_paths())
    t = f"{L.TEACHERS}/*"
    expected = {
        L.IMAGES, L.LABELS, t, L.COMMITS, L.STAGING,
        *(f"{L.IMAGES}/{n}" for n in (L.IDS, L.ID_OFFSETS, L.SOURCE, L.SOURCE_OFFSETS, L.HW, L.GRID, L.PIXELS,
                                       L.PIXEL_OFFSETS, L.OK, L.FAILURES, L.MASKS, L.MASK_OFFSETS)),
        *(f"{L.IMAGES}/{L.FAILURES}/{n}" for n in (L.FAILURE_INDEX, L.FAILURE_REASON, L.FAILURE_REASON_OFFSETS)),
        *(f"{t}/{n}" for n in (L.SUMMARY, L.PATCHES, L.OFFSETS, L.REGISTERS)),
        f"{t}/{L.LAYERS}/*", f"{t}/{L.HEADS}/*", f"{t}/{L.PHIS}/*.npz", f"{t}/{L.TEXT}/*",
    }
    assert expected <= paths, sorted(expected - paths)


def test_a_written_store_holds_only_documented_names_and_attributes(train_store):
    patterns = documented_paths()
    group = zarr.open_group(train_store, mode="r")
    written = [name for name, _ in group.members(max_depth=None)]
    assert written, "the store has no members"
    undocumented = [n for n in written if not any(fnmatch(n, p) or fnmatch(n, p.rsplit("/*", 1)[0]) for p in patterns)]
    assert not undocumented, undocumented

    store = FeatureStore.open(train_store)
    assert set(store.attrs) <= documented_keys("Root attributes"), set(store.attrs) - documented_keys("Root attributes")
    for name in store.teacher_names:
        attrs = set(store.teacher_attrs(name))
        assert attrs <= documented_keys("Teacher attributes"), attrs - documented_keys("Teacher attributes")
        for feature in L.PHIS_FEATURES:
            assert store.exists(f"{L.TEACHERS}/{name}/{L.PHIS}/{feature}.npz")
        for set_name, (_, text_attrs) in store.text_sets(name).items():  # siglip's text/classes
            assert set(text_attrs) <= documented_keys("Text set attributes"), (set_name, set(text_attrs))
    assert store.text_sets("siglip")["classes"][1]["kind"] == "classes"
    from storage.inspect import describe_store  # what `pipeline inspect` prints of them

    assert describe_store(train_store)["teachers"]["siglip"]["text"] == {"classes": {"kind": "classes", "rows": 10}}
    # the tokens of every teacher follow the documented rule: cumulative grid counts of the ok images
    import numpy as np

    ok, grid = store.image_array(L.OK)[:], store.image_array(L.GRID)[:]
    counts = np.where(ok, grid[:, 0] * grid[:, 1], 0)
    for name in store.teacher_names:
        offsets = store.teacher_group(name)[L.OFFSETS][:]
        assert offsets[0] == 0 and np.array_equal(np.diff(offsets), counts)


def test_every_array_reads_the_same_in_another_zarr_implementation(train_store):
    """tensorstore opens every array of a store (no zarr-python-only data type) and reads zarr-python's values;
    the strings decode from its bytes to what the store's reader gives."""
    from storage.strings import decode_strings
    from zarr_compat import assert_every_array_reads_alike, tensorstore_read

    paths = assert_every_array_reads_alike(train_store)
    assert {f"{L.IMAGES}/{L.IDS}", f"{L.IMAGES}/{L.SOURCE}", f"{L.TEACHERS}/dino/{L.PATCHES}"} <= set(paths)
    store = FeatureStore.open(train_store)
    for name, index in ((L.IDS, L.ID_OFFSETS), (L.SOURCE, L.SOURCE_OFFSETS)):
        data, offsets = (tensorstore_read(train_store, f"{L.IMAGES}/{n}") for n in (name, index))
        assert decode_strings(data, offsets) == store.image_strings(name)
    ids = store.image_strings(L.IDS)
    assert len(ids) == store.num_images and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
