"""Typed errors: the core raises these, the CLI turns each into one line and exit status 1."""


class BuildfarmError(Exception):
    """Base of every error a user can cause; its message is the one line they see."""


class DerivationError(BuildfarmError):
    """A .drv file that cannot be read: names the file and the byte offset."""

    def __init__(self, source: str, offset: int, reason: str) -> None:
        self.source = source
        self.offset = offset
        self.reason = reason
        super().__init__(f"{source}: byte {offset}: {reason}")


class ArchiveError(BuildfarmError):
    """A nar or export bundle that is malformed, truncated or fails verification."""


class InventoryError(BuildfarmError):
    """A broken inventory: names file:line:column and says how to fix it."""


class DatastoreError(BuildfarmError):
    """The datastore cannot be opened or is in an unexpected state."""


class NoDatastoreError(DatastoreError):
    """The datastore does not exist yet: only the commands that record something create it."""


class NotFoundError(BuildfarmError):
    """An unknown build UUID or other missing record."""


class UsageError(BuildfarmError):
    """A bad option value (a tag, a date, a duplicate UUID)."""


class RemoteError(BuildfarmError):
    """A machine could not be reached or refused us (host key, login, command)."""


class ProtocolError(RemoteError):
    """A machine answered more than was asked, nonsense, or nothing in time: that session or
    channel is closed and the machine backed off. The message names the machine."""


class AlreadyRunningError(BuildfarmError):
    """Another coordinator already runs on this datastore."""
