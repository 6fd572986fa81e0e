"""Dataset preparation: data/<name>/prepare.py, with the shared pieces in data/common.py."""
