"""Names of the feature-store contract (docs/store-format.md). Other tools read these: never rename."""

FORMAT_VERSION = 4  # 4: teacher features may use the project's codecs; 3: strings as UTF-8 bytes + offsets
READABLE_VERSIONS = (1, 2, 3, 4)  # 1 is 2 without masks, 2 is 3 with zarr-python strings, 3 is 4 without codecs
CODEC_VERSION = 4  # from this version on, a teacher's features may be stored with storage.codecs' codecs
FLAT_STRINGS_VERSION = 3  # from this version on, string arrays are flat bytes (storage.strings)

IMAGES = "images"
TEACHERS = "teachers"
LABELS = "labels"  # [N] int32 next to images/, -1 where unknown

# images/
IDS = "ids"  # [B] uint8, UTF-8 of every image id concatenated (versions 1-2: [N] str)
ID_OFFSETS = "id_offsets"  # [N+1] int64 (version 3)
SOURCE = "source"  # [B] uint8, UTF-8 of every source concatenated (versions 1-2: [N] str)
SOURCE_OFFSETS = "source_offsets"  # [N+1] int64 (version 3)
HW = "hw"  # [N, 2] int32
GRID = "grid"  # [N, 2] int32
PIXELS = "pixels"  # [B] uint8, encoded images concatenated
PIXEL_OFFSETS = "pixel_offsets"  # [N+1] int64
OK = "ok"  # [N] bool
MASKS = "masks"  # [M] uint8, PNG-encoded per-pixel label maps concatenated (format version 2, optional)
MASK_OFFSETS = "mask_offsets"  # [N+1] int64; image i has no mask when mask_offsets[i] == mask_offsets[i+1]
FAILURES = "failures"  # side table group: index [F] int64, reason (UTF-8 bytes + reason_offsets; [F] str before 3)
FAILURE_INDEX = "index"
FAILURE_REASON = "reason"
FAILURE_REASON_OFFSETS = "reason_offsets"

# teachers/<name>/
SUMMARY = "summary"  # [N, D]
PATCHES = "patches"  # [T, D]
OFFSETS = "offsets"  # [N+1] int64
REGISTERS = "registers"  # [N, R, D]
LAYERS = "layers"  # layers/<k> [T, Dk]: block k (1-based) of the teacher, rows aligned with patches


def layer_path(k: int) -> str:
    """``layers/<k>``: the array of block ``k``'s tokens inside a teacher group."""
    return f"{LAYERS}/{int(k)}"
HEADS = "heads"  # heads/<param> frozen teacher parts (e.g. SigLIP2 attention pool)
PHIS = "phis"  # phis/<feature>.npz
TEXT = "text"  # text/<set> [P, D_text]
PHIS_FEATURES = (SUMMARY, PATCHES)  # PHI-S is never estimated for registers (AMoE §3.2)

# bookkeeping that is not part of the data contract
COMMITS = "_commits"
STAGING = "_staging"
LOCKS = "_locks"
