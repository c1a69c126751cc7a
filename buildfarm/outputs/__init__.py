"""The output store: built outputs kept verified, compressed and signed as a static substitute
cache (store.py), served over HTTP by `buildfarm publish` (publish.py), freed by
`buildfarm outputs gc` (gc.py)."""
