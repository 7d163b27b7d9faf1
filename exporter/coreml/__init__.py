"""The Core ML backend of `qwen-edge export`, and checking Core ML packages without Core ML.

coremltools logs at import, on every Linux run, that the Core ML framework is missing and that this
torch is newer than it was tested with; both are known here (packages are checked by the MIL
interpreter instead, and the conversions are tested), so only its errors are shown.
"""

import logging

logging.getLogger("coremltools").setLevel(logging.ERROR)
