"""Root conftest: the quantbench plugin is loaded through its pytest11 entry point when installed.

In a checkout that was not pip-installed, this loads it from the source tree instead, so the
suite's options and markers work either way.
"""

import importlib.metadata


def _plugin_installed() -> bool:
    return any(ep.value == "harness.plugin" for ep in importlib.metadata.entry_points(group="pytest11"))


pytest_plugins = [] if _plugin_installed() else ["harness.plugin"]
