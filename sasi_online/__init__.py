"""sasi_online: contrastive self-supervised learning with semantic-aware synthetic
images (SASI) generated in the loop."""
import os as _os

__version__ = "0.1.0"

# In a source checkout `kernels/` and `engines/` sit beside this package (setup.py
# installs them as sasi_online.kernels / sasi_online.engines). Make the same names
# resolve when running from the checkout, whatever the install mode.
_top = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")) and _os.path.isfile(
    _os.path.join(_top, "kernels", "__init__.py")
):
    __path__.append(_top)  # type: ignore[name-defined]

import logging as _logging

# bitsandbytes (imported by diffusers) warns at every start that the optional `kernels`
# package is missing; only its 4-bit CPU kernels need it, and nothing here uses them.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
