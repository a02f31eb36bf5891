"""invemb: invertible sentence embeddings for financial news.

Import cost is kept low: heavy modules (torch, transformers) load only when a model is built.
"""
from invemb.errors import InvembError

__version__ = "0.1.0"
__all__ = ["InvembError", "InvertibleEmbedder", "__version__"]


def __getattr__(name):  # lazy: `from invemb import InvertibleEmbedder` without importing torch at package import
    if name == "InvertibleEmbedder":
        from invemb.model import InvertibleEmbedder
        return InvertibleEmbedder
    raise AttributeError(name)
