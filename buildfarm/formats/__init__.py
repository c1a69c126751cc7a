"""What Guix and Nix write, read and written byte for byte as they do: derivations (.drv), nars
and export bundles, narinfos, s-expressions, signatures and keys, compressions. Pure functions
over bytes and files; nothing here reaches a machine or the datastore."""
