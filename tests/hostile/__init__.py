"""A deliberately hostile build machine for the tests (RELIABILITY.md, "Hostile inputs"): a
`nix-store` and an sftp-server that misbehave on cue. They are installed on a test host and
run there by its sshd; they never import buildfarm (see tests/test_hostile_machine.py)."""
