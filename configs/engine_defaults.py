"""The engine's defaults and accepted values that command lines show. They live here, not in the
engine's modules, so `serve --help` can build its parser without importing torch and diffusers."""

DEFAULT_MODEL = "builtin/shapes"
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "dummy")  # dummy: the full-size model from its configuration, random weights
# Reading 50+ GB of weights from a slow disk takes minutes; waiting for it costs nothing, because
# the ranks that finish first wait outside any timed collective (forward_broadcast's doorbell).
DEFAULT_STARTUP_TIMEOUT_S = 1800.0
DEFAULT_MAX_LORAS = 4  # LoRA adapters resident on the ranks at once (least recently used dropped beyond)
DEFAULT_MAX_LORA_RANK = 128  # adapters of a higher rank are refused
DEFAULT_MAX_QUEUE_SIZE = 64  # requests admitted at once (waiting or running); more get 429
DEFAULT_MAX_BATCH_SIZE = 8  # images per pipeline call
# The most work one request may ask for: width x height / 1e6 x steps x n. 1000 admits 2048x2048
# x 50 steps x 4 images (840) and refuses the schema's extreme, 2048x2048 x 200 steps x 10 (8389).
DEFAULT_MAX_MEGAPIXEL_STEPS = 1000.0
