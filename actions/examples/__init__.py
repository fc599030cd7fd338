"""Example external actions, served by `python -m actions.worker --example NAME`."""
