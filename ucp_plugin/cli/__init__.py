"""The `ucp` command line (``ucp_plugin.cli.main:main``)."""
