"""CloudBridge core: plugin system, configuration, errors and CLI."""


def __getattr__(name: str) -> str:
    # read when first asked for, not at import: importlib.metadata pulls in the email
    # package, and the `cloudbridge` command's Ctrl-C guard (entry.py) only starts after
    # this package has been imported
    if name != "__version__":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("cloudbridge-core")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"
