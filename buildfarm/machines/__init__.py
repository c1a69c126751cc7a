"""What `buildfarm machines` reports and checks: each machine's recorded state beside a fresh
probe (status.py), and `machines test`, which proves a machine can do what a build needs
(checks.py)."""
