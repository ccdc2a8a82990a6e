"""What Windows' service control manager runs, in pywin32's service host: the client
(``cloudbridge p2p --config C``, or ``tunnel``: as ``service install`` registered it),
stopped cleanly when the service is stopped. Windows only: it imports pywin32."""

from __future__ import annotations

import servicemanager
import win32service
import win32serviceutil

from cloudbridge_core.cli.main import cli, run
from cloudbridge_core.cli.serving import request_stop
from cloudbridge_core.service.windows import SERVICE_NAME


class CloudBridgeService(win32serviceutil.ServiceFramework):
    _svc_name_ = SERVICE_NAME
    _svc_display_name_ = "CloudBridge client"

    def SvcDoRun(self) -> None:  # noqa: N802 - pywin32's name
        config = win32serviceutil.GetServiceCustomOption(SERVICE_NAME, "config")
        self.ReportServiceStatus(win32service.SERVICE_RUNNING)
        command = win32serviceutil.GetServiceCustomOption(SERVICE_NAME, "command") or "p2p"
        code = run(cli, [command, "--config", config])
        servicemanager.LogInfoMsg(f"{SERVICE_NAME} stopped (exit code {code})")

    def SvcStop(self) -> None:  # noqa: N802 - pywin32's name
        self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING)
        request_stop()
