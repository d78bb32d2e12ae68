"""Refuses to build the wheel without the built labextension, which is all the wheel holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class LabextensionBuilt(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        built = Path(self.root) / "labextension" / "package.json"
        if self.target_name == "wheel" and not built.is_file():
            raise RuntimeError(
                f"{built} is missing: the qwenbook-extension wheel is the built labextension. "
                "Build it first with `npm run build -w extension` (or `npm start`) in the checkout."
            )
