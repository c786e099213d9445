"""The service's entry points: the `cxr-triage` command (`python -m service`), which starts and inspects the roles.

The only package that may import every other one; nothing imports it.
"""
