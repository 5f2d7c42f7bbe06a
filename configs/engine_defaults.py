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
