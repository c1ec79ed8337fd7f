"""The project's vocabulary of logical axis names and physical mesh axis names.

Model code names only logical axes (``EMBED``, ``HEADS``...). Mesh files map them onto the
physical axes below; ``longvila_jax.parallel.mesh`` owns that mapping.
"""

# Physical mesh axes, outermost first. ``ulysses`` is innermost so it stays inside a host
# (all-to-all wants NVLink); ``ring`` spans hosts (point-to-point ppermute tolerates IB).
DATA = "data"
FSDP = "fsdp"
RING = "ring"
ULYSSES = "ulysses"
MESH_AXES = (DATA, FSDP, RING, ULYSSES)

# Logical axes of activations.
BATCH = "batch"
SEQ = "seq"
FRAMES = "frames"
PATCHES = "patches"

# Logical axes of parameters.
LAYERS = "layers"  # the leading axis of scanned (stacked) layers
EMBED = "embed"  # LLM model width
VOCAB = "vocab"
HEADS = "heads"  # fused query heads x head_dim
KV_HEADS = "kv_heads"  # fused key/value heads x head_dim
MLP = "mlp"
VISION_EMBED = "vision_embed"
VISION_HEADS = "vision_heads"
VISION_MLP = "vision_mlp"
PROJ_IN = "proj_in"  # projector input width (merged vision channels)
NORM = "norm"  # norm scales/biases (usually replicated)
CONV = "conv"  # patch-embedding spatial/channel dims (replicated)

LOGICAL_AXES = (
    BATCH,
    SEQ,
    FRAMES,
    PATCHES,
    LAYERS,
    EMBED,
    VOCAB,
    HEADS,
    KV_HEADS,
    MLP,
    VISION_EMBED,
    VISION_HEADS,
    VISION_MLP,
    PROJ_IN,
    NORM,
    CONV,
)
