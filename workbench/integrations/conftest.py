"""pytest collection rules for the adapters (one place, with the reasons).

- ``verl_plugin.py`` is never collected: importing it installs import hooks (its purpose in verl workers).
- ``trl.py`` is collected for doctests only when TRL is installed (it subclasses TRL's trainer at import).
"""

from __future__ import annotations

import importlib.util

collect_ignore = ["verl_plugin.py"]
if importlib.util.find_spec("trl") is None:
    collect_ignore.append("trl.py")
