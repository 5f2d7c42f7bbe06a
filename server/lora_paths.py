"""Which adapter paths POST /v1/load_lora_adapter may read: only under the allowed folders
(--allowed-lora-paths, else the folders of --lora-modules), and the hub only when "hub" is listed.

A refusal reads nothing and says the same for a path that exists and one that does not, so the
route cannot be used to learn which files the server's process can see.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

HUB = "hub"
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass(frozen=True)
class LoraPathPolicy:
    roots: tuple[Path, ...]
    allow_hub: bool = False

    @classmethod
    def from_flags(cls, allowed: list[str] | None, lora_modules: dict[str, str]) -> "LoraPathPolicy":
        if allowed is None:  # the folders the start-up adapters came from
            allowed = [path if Path(path).is_dir() else str(Path(path).parent)
                       for path in lora_modules.values() if Path(path).exists()]
        roots = tuple(Path(entry).expanduser().resolve() for entry in allowed if entry != HUB)
        return cls(roots, allow_hub=HUB in allowed)

    def checked(self, path: str) -> str:
        """What to load for `path`: its resolved local path (so a missing file is never taken for a
        hub id), or a hub id where allowed; LoraPathRefused, in words that do not depend on the file
        system, otherwise."""
        resolved = Path(path).expanduser().resolve()  # symlinks followed: a link out of a root is outside it
        if any(resolved.is_relative_to(root) for root in self.roots):
            return str(resolved)
        if self.allow_hub and _HUB_ID.match(path) and not Path(path).exists():
            return path
        where = ", ".join(str(root) for root in self.roots) or "none (start with --allowed-lora-paths)"
        hub = "; hub ids are allowed" if self.allow_hub else ""
        raise LoraPathRefused(f"lora_path is not under an allowed folder (allowed: {where}{hub})")


class LoraPathRefused(ValueError):
    pass
