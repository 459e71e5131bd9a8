"""The runtime: what a process has once (clock, event bus, OS signals, retries).

Internal: import the public API from :mod:`kongtask`; these modules may change.
"""
