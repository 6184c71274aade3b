"""tq_hf: TurboQuant KV-cache compression for Hugging Face transformers.

`import tq_hf` registers `attn_implementation="turboquant"`; pass `past_key_values=TurboQuantCache()`
to `generate`.
"""

from .attention import register as _register
from .cache import TurboQuantCache, TurboQuantLayer
from .codec import TurboQuantizer
from .config import PRESETS, TurboQuantConfig

__all__ = ["TurboQuantCache", "TurboQuantLayer", "TurboQuantConfig", "TurboQuantizer", "PRESETS"]
__version__ = "0.1.0"

_register()
