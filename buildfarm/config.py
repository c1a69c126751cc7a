"""Where buildfarm keeps its things: resolved once from options, BUILDFARM_* variables, defaults."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass


def _xdg(variable: str, fallback: str) -> str:
    return os.environ.get(variable) or os.path.join(os.path.expanduser("~"), fallback)


def default_state_dir() -> str:
    """$XDG_STATE_HOME/buildfarm, else ~/.local/state/buildfarm."""
    return os.path.join(_xdg("XDG_STATE_HOME", ".local/state"), "buildfarm")


def default_config_dir() -> str:
    """$XDG_CONFIG_HOME/buildfarm, else ~/.config/buildfarm."""
    return os.path.join(_xdg("XDG_CONFIG_HOME", ".config"), "buildfarm")


def private_directory(path: str) -> None:
    """Make the state directory if it is missing, and keep it 0700 (only its owner may enter):
    it holds the datastore, the signing key and every build log."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if mode & 0o077:
        os.chmod(path, mode & 0o700)


@dataclass(frozen=True, slots=True)
class Settings:
    """The four global settings every command shares."""

    state_dir: str
    db_url: str
    inventory_path: str
    hooks_dir: str

    @classmethod
    def resolve(
        cls,
        *,
        state_dir: str | None = None,
        db_url: str | None = None,
        inventory_path: str | None = None,
        hooks_dir: str | None = None,
    ) -> Settings:
        """Explicit values win; click has already applied the BUILDFARM_* variables."""
        state = os.path.abspath(os.path.expanduser(state_dir or default_state_dir()))
        config = default_config_dir()
        return cls(
            state_dir=state,
            db_url=db_url or f"sqlite://{os.path.join(state, 'buildfarm.db')}",  # state is absolute
            inventory_path=os.path.expanduser(
                inventory_path or os.path.join(config, "inventory.yaml")
            ),
            hooks_dir=os.path.expanduser(hooks_dir or os.path.join(config, "hooks.d")),
        )

    @property
    def logs_dir(self) -> str:
        return os.path.join(self.state_dir, "logs")

    @property
    def outputs_dir(self) -> str:
        return os.path.join(self.state_dir, "outputs")
