"""The client as a Windows service, registered through pywin32
(``pip install cloudbridge-core[windows]``).

:func:`definition` is what ``cloudbridge service install`` registers (``--dry-run`` prints
it, and the tests check it on any OS); :func:`install` and :func:`uninstall` talk to the
service control manager, which then runs :class:`~cloudbridge_core.service.windows_host.
CloudBridgeService` in pywin32's service host.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cloudbridge_core.config import Config
from cloudbridge_core.service.command import client_command

SERVICE_NAME = "CloudBridge"
SERVICE_CLASS = "cloudbridge_core.service.windows_host.CloudBridgeService"
#: a built-in account with no admin rights and no password to keep
ACCOUNT = r"NT AUTHORITY\LocalService"


def definition(config: Config, config_path: Path) -> dict[str, Any]:
    delay_ms = round(config.settings.service.restart_delay * 1000)
    restart = config.settings.service.auto_restart
    return {
        "name": SERVICE_NAME,
        "display_name": "CloudBridge client",
        "description": config.settings.service.description,
        "class": SERVICE_CLASS,
        "start_type": "auto",
        "account": ACCOUNT,
        "config": str(config_path.resolve()),
        # p2p or tunnel, as the config says (see service.command)
        "command": client_command(config),
        # three restarts after failures, reset after a day without one
        "failure_actions": {
            "reset_period_seconds": 86400,
            "actions": [{"type": "restart" if restart else "none", "delay_ms": delay_ms}] * 3,
        },
    }


def install(service: dict[str, Any]) -> None:
    import win32service
    import win32serviceutil

    win32serviceutil.InstallService(
        service["class"],
        service["name"],
        service["display_name"],
        startType=win32service.SERVICE_AUTO_START,
        userName=service["account"],
        description=service["description"],
    )
    win32serviceutil.SetServiceCustomOption(service["name"], "config", service["config"])
    win32serviceutil.SetServiceCustomOption(service["name"], "command", service["command"])
    handle = win32service.OpenSCManager(None, None, win32service.SC_MANAGER_ALL_ACCESS)
    try:
        registered = win32service.OpenService(
            handle, service["name"], win32service.SERVICE_ALL_ACCESS
        )
        actions = [
            (
                win32service.SC_ACTION_RESTART
                if action["type"] == "restart"
                else win32service.SC_ACTION_NONE,
                action["delay_ms"],
            )
            for action in service["failure_actions"]["actions"]
        ]
        win32service.ChangeServiceConfig2(
            registered,
            win32service.SERVICE_CONFIG_FAILURE_ACTIONS,
            {
                "ResetPeriod": service["failure_actions"]["reset_period_seconds"],
                "RebootMsg": None,
                "Command": None,
                "Actions": actions,
            },
        )
        win32service.CloseServiceHandle(registered)
    finally:
        win32service.CloseServiceHandle(handle)


def uninstall() -> None:
    import win32serviceutil

    win32serviceutil.RemoveService(SERVICE_NAME)
