"""Prefect flows (installed as `polyculture.flows`): thin wrappers that wire the stages as tasks."""
