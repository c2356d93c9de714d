"""Patches of upstream code (see README.md). Installed as ``ucp_plugin._patches``."""
