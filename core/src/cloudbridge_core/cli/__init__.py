"""The ``cloudbridge`` command line."""
