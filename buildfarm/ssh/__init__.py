"""Reaching a build machine: the one SSH connection (host key checked), remote commands and their
process groups, the SFTP client and local copies that pull files, and Nix store sessions
(`nix-store --serve`). The only part that talks to a machine; it knows nothing of builds."""
