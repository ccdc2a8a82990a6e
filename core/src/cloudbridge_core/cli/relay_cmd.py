"""``cloudbridge relay``: serve, issue tokens signed by the relay's own key and invites,
and show the overlay addresses it leases."""

from __future__ import annotations

import base64
import contextlib
import difflib
import ipaddress
import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import yaml

from cloudbridge_core.cli.main import SuggestingGroup
from cloudbridge_core.cli.output import emit_json, json_option, message, table
from cloudbridge_core.cli.params import DURATION
from cloudbridge_core.cli.runtime import config_option, runtime_of
from cloudbridge_core.cli.serving import run_async, wait_for_stop
from cloudbridge_core.config import Config, validate
from cloudbridge_core.durations import format_duration
from cloudbridge_core.errors import UsageError
from cloudbridge_core.exporters import RELAY_METRICS_PORT, exporting
from cloudbridge_core.log import escape, get_logger
from cloudbridge_core.plugins import Plugins, transport_port
from cloudbridge_core.prometheus_exporter import PrometheusExporter
from cloudbridge_core.relay.cluster.backend import run_once
from cloudbridge_core.relay.cluster.store import (
    Invite,
    InviteEntry,
    Revocation,
    is_invite_id,
)
from cloudbridge_core.relay.invites import InviteLink, new_code
from cloudbridge_core.relay.live import follow
from cloudbridge_core.relay.runner import RunningRelay, browser_login, start_relay, state_dir_of
from cloudbridge_core.relay.state import RelayState
from cloudbridge_core.relay.tokens import PERMISSIONS, issue_token, jwks, unknown_permissions
from cloudbridge_core.tenants import is_tenant_id

if TYPE_CHECKING:
    from cloudbridge_core.relay.console.actions import ConsoleContext

log = get_logger("relay")

#: a revocation outlasts the tokens it covers by this much: validators accept a token a
#: little past its ``exp`` (their clock-skew leeway)
REVOCATION_MARGIN = 3600.0
#: the longest token id a relay takes from a token (cloudbridge-jwt's limit too)
MAX_TOKEN_ID_LENGTH = 256

state_dir_option = click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the relay keeps its CA, keys and client.yaml (default: server.state_dir).",
)


@click.group(cls=SuggestingGroup)
def relay() -> None:
    """Run a relay, issue its tokens and invites, list its overlay addresses."""


@relay.command()
@config_option
@state_dir_option
@click.option(
    "--dev", is_flag=True, help="Development mode: tunnels may reach the relay's loopback."
)
@click.pass_context
def serve(ctx: click.Context, state_dir: Path | None, dev: bool) -> None:
    """Serve clients on every installed transport (each on its transport.<name>.port),
    following changes to the config file (and SIGHUP): egress, limits, timeouts and auth
    keys apply at once without dropping sessions; what needs a restart is logged as such."""
    runtime = runtime_of(ctx)
    config = runtime.config()

    async def main() -> None:
        running = await start_relay(config, runtime.plugins, state_dir=state_dir, dev=dev)
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(running.aclose)  # also when an exporter fails to start
            exporters = await stack.enter_async_context(
                exporting(
                    config,
                    runtime.plugins,
                    running.relay.metrics.registry,
                    running.probes(),
                    default_port=RELAY_METRICS_PORT,  # the client keeps 9464
                )
            )
            # drained while /metrics and /readyz still answer; exporters flush after
            stack.push_async_callback(running.aclose)
            served = exporters.get("prometheus")
            if isinstance(served, PrometheusExporter) and served.url:
                message(f"metrics and probes: {served.url}, /healthz, /readyz")
            # the console's imports (jinja2, segno) are for a relay that serves, not every command
            from cloudbridge_core.relay.console.serve import serving_console

            console = await stack.enter_async_context(
                serving_console(config, _console_context(running, config, runtime.plugins))
            )
            if console is not None:
                message(f"console: {console} (log in with a relay:admin token)")
            listen = config.settings.server.listen
            for name, listener in running.listeners.items():
                message(f"relay listening: {name} on {listen}:{listener.port}")
            message(f"CA fingerprint (sha256): {running.state.ca.fingerprint()}")
            message(f"client config: {running.client_config}")
            if dev:
                message("development mode: tunnels may reach this host's loopback")
            path = runtime.config_path
            if path is not None:

                def load() -> Config:
                    return validate(runtime.read(path), runtime.schema)

                async def follow_exporters(new: Config) -> list[str]:
                    return [f"exporter {name}" for name in await exporters.apply(new)]

                watcher = follow(running, config, runtime.plugins, load, path, dev=dev)
                watcher.subscribe(runtime.follow_logging(config.settings.logging))
                watcher.subscribe(follow_exporters)
                await stack.enter_async_context(watcher)
                message(f"following {path}: changes (and SIGHUP) reload it")
            await wait_for_stop()

    run_async(main)


def _console_context(running: RunningRelay, config: Config, plugins: Plugins) -> ConsoleContext:
    from cloudbridge_core.relay.console.actions import ConsoleContext

    listeners = running.listeners
    # invites name the tls port, as ``relay invite create`` does (any port when tls is off)
    tls = listeners["tls"] if "tls" in listeners else next(iter(listeners.values()))
    return ConsoleContext(
        running.relay,
        running.state,
        running.public_host,
        tls.port,
        config.settings.server.max_token_ttl,
        browser_login(config, plugins, running.state),
    )


@relay.group(cls=SuggestingGroup)
def token() -> None:
    """Tokens signed by the relay's own key."""


@token.command("issue")
@config_option
@state_dir_option
@click.option(
    "--tenant", required=True, help="Tenant id (everything the token allows is scoped to it)."
)
@click.option("--subject", required=True, help="Who or what the token is for (a machine name).")
@click.option(
    "--permission",
    "permissions",
    multiple=True,
    help=f"What the token allows (repeatable; at least one): {', '.join(PERMISSIONS)}.",
)
@click.option(
    "--ttl", type=DURATION, default=None, help='Lifetime, like "24h" (default: server.token_ttl).'
)
@click.option("--mesh-config", "mesh", help="JSON object for the custom:mesh_config claim.")
@click.option(
    "--network-config", "network", help="JSON object for the custom:network_config claim."
)
@click.pass_context
def issue(
    ctx: click.Context,
    state_dir: Path | None,
    tenant: str,
    subject: str,
    permissions: tuple[str, ...],
    ttl: float | None,
    mesh: str | None,
    network: str | None,
) -> None:
    """Print a signed token (stdout) for a client of this relay; its id (for ``relay token
    revoke --id``) goes to stderr."""
    config = runtime_of(ctx).config()
    _check_permissions(permissions, required=True)
    lifetime = ttl if ttl is not None else config.settings.server.token_ttl
    _check_lifetime("--ttl" if ttl is not None else "server.token_ttl", lifetime, config)
    _check_tenant(tenant)
    try:
        state = RelayState.load(state_dir_of(config, state_dir))
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    token = issue_token(
        state.signing_key,
        issuer=state.issuer,
        tenant=tenant,
        subject=subject,
        permissions=permissions,
        ttl=lifetime,
        max_ttl=config.settings.server.max_token_ttl,
        extra={
            **_json_claim("custom:mesh_config", "--mesh-config", mesh),
            **_json_claim("custom:network_config", "--network-config", network),
        },
    )
    click.echo(token)
    message(f"token id: {_token_id(token)}")


def _token_id(token: str) -> str:
    """The ``jti`` of a token :func:`issue_token` has just signed (its payload is ours)."""
    payload = token.split(".")[1]
    return str(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["jti"])


def _check_permissions(permissions: tuple[str, ...], *, required: bool) -> None:
    """Only permissions the relay checks: a typo would mint a token that is refused later."""
    known = f"known: {', '.join(PERMISSIONS)}"
    needs = (
        "a client needs relay:connect, plus tunnel:create to forward ports"
        " or p2p:mesh to join the mesh"
    )
    if required and not permissions:
        raise UsageError(f"--permission: give at least one ({known})", hint=needs)
    unknown = unknown_permissions(permissions)
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(PERMISSIONS), n=1)
        raise UsageError(
            f"--permission: {unknown[0]!r} is not a permission the relay knows ({known})",
            hint=f"did you mean {close[0]!r}?" if close else needs,
        )


def _check_lifetime(what: str, lifetime: float, config: Config) -> None:
    """A token or invite outliving ``server.max_token_ttl`` is refused here, named."""
    maximum = config.settings.server.max_token_ttl
    if lifetime > maximum:
        raise UsageError(
            f"{what}: {format_duration(lifetime)} is longer than the maximum"
            f" {format_duration(maximum)} (server.max_token_ttl)",
            hint="choose a shorter lifetime, or raise server.max_token_ttl in the relay's config",
        )


def _check_tenant(tenant: str) -> None:
    if not is_tenant_id(tenant):
        raise UsageError(
            f"--tenant: {tenant!r} is not a tenant id (lowercase letters, digits, '.', '_'"
            " and '-', starting with a letter or digit, at most 63 characters)"
        )


def _json_claim(claim: str, flag: str, text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag}: not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag}: must be a JSON object")
    return {claim: value}


@token.command("jwks")
@state_dir_option
@click.pass_context
def show_jwks(ctx: click.Context, state_dir: Path | None) -> None:
    """Print the relay's public JWKS (what an external validator needs)."""
    config = runtime_of(ctx).config()
    try:
        state = RelayState.load(state_dir_of(config, state_dir))
    except FileNotFoundError as exc:
        raise UsageError(str(exc)) from None
    click.echo(json.dumps(jwks(state.signing_key), indent=2))


@token.command("revoke")
@config_option
@state_dir_option
@click.option("--tenant", required=True, help="Tenant of the tokens to revoke.")
@click.option("--id", "token_id", help="The token's id (jti; 'relay token issue' prints it).")
@click.option("--subject", help="Every token of this subject issued until now.")
@json_option
@click.pass_context
def revoke(
    ctx: click.Context,
    state_dir: Path | None,
    tenant: str,
    token_id: str | None,
    subject: str | None,
    as_json: bool,
) -> None:
    """Revoke a token (--id) or every token of a subject issued until now (--subject):
    relays refuse them and end their open sessions within seconds."""
    config = runtime_of(ctx).config()
    _check_tenant(tenant)
    if (token_id is None) == (subject is None):
        raise UsageError(
            "give exactly one of --id and --subject",
            hint="--id revokes one token; --subject, every token of that subject issued so far",
        )
    if token_id is not None and not 0 < len(token_id) <= MAX_TOKEN_ID_LENGTH:
        raise UsageError(f"--id: a token id has 1 to {MAX_TOKEN_ID_LENGTH} characters")
    if subject == "":
        raise UsageError("--subject: give the subject the tokens were issued for")
    now = time.time()
    # every token a relay accepts expires within server.max_token_ttl of its issue
    until = now + config.settings.server.max_token_ttl + REVOCATION_MARGIN
    revocation = Revocation(tenant, now, until, token_id=token_id, subject=subject)
    cluster = config.settings.server.cluster
    run_once(cluster, _relay_state_dir(config, state_dir), lambda store: store.revoke(revocation))
    what = f"token {token_id}" if token_id else f"the tokens of subject {subject!r} issued so far"
    them = "it" if token_id else "them"
    message(f"revoked {escape(what)} of tenant {tenant}: relays refuse {them} within seconds")
    if as_json:
        emit_json(_revocation_row(revocation))


@token.command("revocations")
@config_option
@state_dir_option
@json_option
@click.pass_context
def list_revocations(ctx: click.Context, state_dir: Path | None, as_json: bool) -> None:
    """Show the revocations in force (stdout): tenant, token id or subject, when it was
    made and when it lapses (once every token it covers has expired), in UTC."""
    config = runtime_of(ctx).config()
    directory = _relay_state_dir(config, state_dir)
    revocations = run_once(config.settings.server.cluster, directory, lambda s: s.revocations())
    rows = [_revocation_row(r) for r in sorted(revocations, key=lambda r: r.revoked_at)]
    if as_json:
        emit_json({"revocations": rows})
        return
    if not rows:
        message("no revocation is in force")
        return
    click.echo(
        table(
            [
                (
                    r["tenant"],
                    escape(f"id {r['token_id']}" if r["token_id"] else f"subject {r['subject']}"),
                    r["revoked_at"],
                    r["until"],
                )
                for r in rows
            ],
            ("TENANT", "TOKENS", "REVOKED AT", "UNTIL"),
        )
    )


def _relay_state_dir(config: Config, override: Path | None) -> Path:
    """The relay's state directory, which must exist: the memory backend keeps its
    revocations there (another backend keeps them elsewhere, any directory will do)."""
    directory = state_dir_of(config, override)
    if config.settings.server.cluster.backend == "memory" and not directory.is_dir():
        raise UsageError(
            f"no relay state in {directory}",
            hint="pass the relay's --state-dir (or server.state_dir), or start"
            " 'cloudbridge relay serve' first",
        )
    return directory


def _revocation_row(revocation: Revocation) -> dict[str, Any]:
    return {
        "tenant": revocation.tenant_id,
        "token_id": revocation.token_id,
        "subject": revocation.subject,
        "revoked_at": _utc(revocation.revoked_at),
        "until": _utc(revocation.until),
    }


@relay.group(cls=SuggestingGroup)
def invite() -> None:
    """One-time invite links that bring a machine onto this relay (cloudbridge join)."""


@invite.command("create")
@config_option
@state_dir_option
@click.option("--tenant", required=True, help="Tenant the invited machine joins.")
@click.option(
    "--permission",
    "permissions",
    multiple=True,
    help="What its token allows (default: relay:connect, tunnel:create, p2p:mesh).",
)
@click.option(
    "--ttl", type=DURATION, default="24h", show_default=True, help="How long the invite is valid."
)
@click.option("--uses", default=1, show_default=True, type=click.IntRange(1, 10000))
@click.pass_context
def create_invite(
    ctx: click.Context,
    state_dir: Path | None,
    tenant: str,
    permissions: tuple[str, ...],
    ttl: float,
    uses: int,
) -> None:
    """Print an invite URL (stdout, alone): its secret is a one-time code, not a token."""
    config = runtime_of(ctx).config()
    lifetime = ttl
    if lifetime <= 0:
        raise UsageError("--ttl: an invite needs a lifetime above zero")
    _check_lifetime("--ttl", lifetime, config)
    _check_tenant(tenant)
    _check_permissions(permissions, required=False)
    try:
        state = RelayState.load(state_dir_of(config, state_dir))
    except FileNotFoundError as exc:
        raise UsageError(str(exc), hint="run 'cloudbridge relay serve' once first") from None
    granted = list(permissions or ("relay:connect", "tunnel:create", "p2p:mesh"))
    code, key = new_code()
    invite = Invite(tenant, granted, time.time() + lifetime, uses)
    cluster = config.settings.server.cluster
    run_once(cluster, state.directory, lambda store: store.add_invite(key, invite))
    host, port = _served_address(state.directory / "client.yaml", config)
    link = InviteLink(host, port, code, state.ca.certificate)
    click.echo(link.url())


@invite.command("list")
@config_option
@state_dir_option
@click.option("--tenant", help="Only this tenant's invites (default: every tenant's).")
@json_option
@click.pass_context
def list_invites(
    ctx: click.Context, state_dir: Path | None, tenant: str | None, as_json: bool
) -> None:
    """Show the invites still usable (stdout), the soonest to expire first: id (for 'relay
    invite revoke'), tenant, permissions, uses left and expiry (UTC). Never their codes:
    the relay keeps only their hashes."""
    config = runtime_of(ctx).config()
    if tenant is not None:
        _check_tenant(tenant)
    directory = _relay_state_dir(config, state_dir)
    cluster = config.settings.server.cluster
    entries = run_once(cluster, directory, lambda store: store.list_invites(tenant))
    rows = [_invite_row(entry) for entry in entries]
    if as_json:
        emit_json({"invites": rows})
        return
    if not rows:
        message(f"tenant {tenant} has no usable invite" if tenant else "no invite is usable")
        return
    click.echo(
        table(
            [
                (
                    r["invite_id"],
                    # what a Redis holds may be anyone's: nothing in it may drive the terminal
                    escape(r["tenant"]),
                    escape(", ".join(r["permissions"])),
                    str(r["uses_left"]),
                    r["expires_at"],
                )
                for r in rows
            ],
            ("ID", "TENANT", "PERMISSIONS", "USES LEFT", "EXPIRES AT"),
        )
    )


@invite.command("revoke")
@config_option
@state_dir_option
@click.argument("invite_id")
@click.option("--tenant", help="Revoke it only if it is this tenant's.")
@json_option
@click.pass_context
def revoke_invite(
    ctx: click.Context,
    state_dir: Path | None,
    invite_id: str,
    tenant: str | None,
    as_json: bool,
) -> None:
    """Revoke an invite by its id ('relay invite list' shows it): its code no longer
    brings anyone in."""
    config = runtime_of(ctx).config()
    if tenant is not None:
        _check_tenant(tenant)
    if not is_invite_id(invite_id):
        raise UsageError(
            f"{invite_id[:64]!r} is not an invite id (12 hex characters)",
            hint="'cloudbridge relay invite list' shows the ids",
        )
    directory = _relay_state_dir(config, state_dir)
    cluster = config.settings.server.cluster
    revoked = run_once(cluster, directory, lambda store: store.revoke_invite(tenant, invite_id))
    if as_json:
        emit_json({"revoked": revoked, "invite_id": invite_id})
    whose = f" of tenant {tenant}" if tenant else ""
    if not revoked:
        raise UsageError(
            f"no usable invite {invite_id}{whose} (unknown, used up, expired or revoked)",
            hint="'cloudbridge relay invite list' shows the usable invites",
        )
    message(f"revoked invite {invite_id}{whose}: its code no longer brings anyone in")


def _invite_row(entry: InviteEntry) -> dict[str, Any]:
    return {
        "invite_id": entry.invite_id,
        "tenant": entry.tenant_id,
        "permissions": entry.permissions,
        "uses_left": entry.uses_left,
        "expires_at": _utc(entry.expires_at),
    }


def _served_address(client_config: Path, config: Config) -> tuple[str, int]:
    """Where the relay of this state directory serves tls: the ``client.yaml`` its last
    ``relay serve`` wrote holds the host and the port it really listens on (this command's
    own config may not be that relay's: no --config, other ports, port 0)."""
    host = config.settings.server.public_host or config.settings.relay.host
    try:
        written = yaml.safe_load(client_config.read_text())
    except (OSError, yaml.YAMLError):
        written = None
    if isinstance(written, dict):
        relay = written.get("relay")
        port = (written.get("transport") or {}).get("tls", {}).get("port")
        if isinstance(port, int) and not isinstance(port, bool):
            served = relay.get("host") if isinstance(relay, dict) else None
            return (served if isinstance(served, str) and served else host), port
    return host, transport_port("tls", config.data)


@relay.group(cls=SuggestingGroup)
def ipam() -> None:
    """Overlay addresses the relay leases to each tenant's devices (server.overlay)."""


@ipam.command("list")
@config_option
@state_dir_option
@click.option("--tenant", required=True, help="Tenant whose overlay addresses to show.")
@json_option
@click.pass_context
def list_leases(ctx: click.Context, state_dir: Path | None, tenant: str, as_json: bool) -> None:
    """Show a tenant's overlay addresses (stdout): device, peer id, address and when the
    device was last seen (UTC). Reads the relay's state directory, or the cluster's Redis
    (server.cluster.backend: redis), whether the relays run or not."""
    config = runtime_of(ctx).config()
    _check_tenant(tenant)
    directory = state_dir_of(config, state_dir)
    cluster = config.settings.server.cluster
    if cluster.backend == "redis":
        where = "the cluster's Redis"
    elif directory.is_dir():
        where = str(directory)
    else:
        raise UsageError(
            f"no relay state in {directory}",
            hint="pass the relay's --state-dir (or server.state_dir), or start"
            " 'cloudbridge relay serve' first",
        )
    held = run_once(cluster, directory, lambda store: store.ipam_leases(tenant))
    leases = sorted(held.values(), key=lambda lease: ipaddress.IPv4Address(lease.address))
    if not leases:
        raise UsageError(
            f"tenant {tenant!r} holds no overlay addresses in {where}",
            hint="a device gets one when it joins the mesh with overlay.enabled",
        )
    rows = [
        {
            "device": lease.device,
            "peer_id": lease.peer_id,
            "address": lease.address,
            "last_seen": _utc(lease.last_seen),
        }
        for lease in leases
    ]
    if as_json:
        emit_json({"tenant": tenant, "leases": rows})
        return
    click.echo(
        table(
            # a device names itself: nothing in its name may drive the terminal
            [(escape(r["device"]), r["peer_id"], r["address"], r["last_seen"]) for r in rows],
            ("DEVICE", "PEER ID", "ADDRESS", "LAST SEEN"),
        )
    )


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
