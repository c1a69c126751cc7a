"""The coordinator's signing key as operators see it: generated on request, shown in the form
`guix archive --authorize` and Nix's `trusted-public-keys` take, and its Nix key name.

The key itself (signing.py) lives in STATE_DIR/signing-key.secret (mode 0600). Nix names keys
(`NAME:BASE64`) and checks the name, so the name is chosen once and kept in
STATE_DIR/signing-key.name: a later change of host name must not invalidate published narinfos.
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

from buildfarm.errors import NotFoundError, UsageError
from buildfarm.formats.signing import SECRET_KEY_FILE, SigningKey, load_key, save_key

NAME_FILE = "signing-key.name"
PUBLIC_FILE = "signing-key.pub"
FORMATS = ("guix", "nix")


def default_key_name() -> str:
    """`HOST-1`, the way Nix's manual names cache keys (e.g. cache.example.org-1)."""
    host = "".join(c for c in socket.gethostname() if c.isalnum() or c in "-._") or "buildfarm"
    return f"{host}-1"


def _check_name(name: str) -> str:
    if not name or ":" in name or any(c.isspace() for c in name):
        raise UsageError(f"invalid key name {name!r}: no colon or white space")
    return name


def _write(path: Path, text: str, mode: int) -> None:
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def key_name(state_dir: str | os.PathLike[str]) -> str:
    """The Nix name of the coordinator's key; the first call records the default."""
    path = Path(state_dir) / NAME_FILE
    try:
        return _check_name(path.read_text(encoding="utf-8").strip())
    except FileNotFoundError:
        pass
    name = default_key_name()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write(path, name + "\n", 0o644)
    except OSError:
        pass  # a read-only state directory: the name is still the default one
    return name


def generate(
    state_dir: str | os.PathLike[str], *, name: str | None = None, force: bool = False
) -> SigningKey:
    """A new key pair in the state directory: the secret (0600), the Guix public key file and
    the Nix key name."""
    if name is not None:
        _check_name(name)
    key = SigningKey.generate()
    save_key(key, state_dir, overwrite=force)
    directory = Path(state_dir)
    _write(directory / PUBLIC_FILE, key.guix_public_sexp(), 0o644)
    if name is not None or not (directory / NAME_FILE).exists():
        _write(directory / NAME_FILE, (name or default_key_name()) + "\n", 0o644)
    return key


def public_key(state_dir: str | os.PathLike[str], form: str) -> str:
    """The public key, ending in a newline: `guix` prints the s-expression `guix archive
    --authorize` reads, `nix` prints the `NAME:BASE64` line for `trusted-public-keys`."""
    if form not in FORMATS:
        raise UsageError(f"unknown key format {form!r}: use guix or nix")
    if not (Path(state_dir) / SECRET_KEY_FILE).exists():
        raise NotFoundError(
            f"no signing key in {state_dir}: make one with `buildfarm key generate` "
            "(`buildfarm run` also makes one when it starts)"
        )
    key = load_key(state_dir)
    if form == "guix":
        return key.guix_public_sexp()
    return key.nix_public(key_name(state_dir)) + "\n"
