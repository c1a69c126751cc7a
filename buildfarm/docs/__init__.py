"""Documentation generated from the code so it cannot drift: the man pages (manpages.py, with
command_pages.py, inventory_page.py and roff.py) and the `--json` shapes of every command
(json_schemas.py), which the tests check against real output."""
