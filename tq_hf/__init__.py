"""tq_hf: TurboQuant KV-cache compression for Hugging Face transformers.

`import tq_hf` registers `attn_implementation="turboquant"`; pass `past_key_values=TurboQuantCache()`
to `generate`.
"""

import os as _os

# In a source checkout `kernels/` sits beside `tq_hf/` (the layout the project chose). When this
# package is imported from the checkout itself (the repository root on sys.path shadows the
# installed finder), make that folder importable as `tq_hf.kernels` too.
_checkout_kernels = _os.path.join(_os.path.dirname(__path__[0]), "kernels", "__init__.py")
if _os.path.exists(_checkout_kernels) and not _os.path.isdir(_os.path.join(__path__[0], "kernels")):
    __path__.append(_os.path.dirname(__path__[0]))

from .attention import register as _register
from .cache import TurboQuantCache, TurboQuantLayer
from .codec import TurboQuantizer
from .config import PRESETS, TurboQuantConfig

__all__ = ["PRESETS", "TurboQuantCache", "TurboQuantConfig", "TurboQuantLayer", "TurboQuantizer"]
__version__ = "0.1.0"

_register()
