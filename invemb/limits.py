"""Limits on user-controlled sizes, declared once: the CLI, the Python API, the client and the Triton models check
against these (a request beyond them is a one-line InvembError / INVALID_ARGUMENT naming the value)."""

MAX_BEAM_SIZE = 32  # beam search width
MAX_BATCH_SIZE = 4096  # texts or vectors per batch
MAX_SEQUENCE = 512  # max_length of a model config (tokens incl. specials)
MAX_VECTOR_ABS = 1.0e4  # |component| of a sentence vector; trained vectors are O(1) (LayerNorm outputs)
MAX_MODEL_WIDTH = 16384  # d_model / d_ff / sentence_dim / hidden sizes in a config
MAX_TEXT_CHARS = 2000  # characters per text (longer: rejected by servers; truncated to max_length tokens)


def check_range(name: str, value, low: int, high: int) -> int:
    """value as an int in [low, high], else an InvembError naming `name` (an argument or config key)."""
    from invemb.errors import InvembError
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvembError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise InvembError(f"{name} must be in [{low}, {high}], got {value}")
    return value
