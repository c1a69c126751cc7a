"""The `buildfarm run` service: startup, main loop and shutdown (service.py), its machines
(fleet.py), which build goes where (scheduler.py), one attempt's steps (attempt.py) and how it
reads what a machine said (machine_said.py), hooks,
metrics, the run lock, the live view, and the coordinator's own store (localstore.py)."""
