"""Distributed jobs over many images (Ray), image sources, teacher adapters, bundled data sets."""

# The curation manifest registers itself as a kind of IMAGES for stages.sources.list_images; importing
# it here makes every caller of list_images (cache-teachers included) accept a manifest.
from . import manifest as _manifest  # noqa: F401
