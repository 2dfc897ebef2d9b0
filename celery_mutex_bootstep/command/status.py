"""``celery mutex status``: the ZooKeeper servers, the namespace, each worker's session."""
from __future__ import annotations

import socket
import ssl
from typing import Any, Dict, List, Optional, Sequence

import click
from celery.bin.base import CeleryCommand
from celery.exceptions import CeleryCommandException
from kazoo.client import KazooClient
from kazoo.exceptions import NoAuthError, NoNodeError
from kazoo.hosts import collect_hosts

from ..text import table
from .exits import status_status
from .leases import LeaseNode, read_leases
from .options import Options, Target, mutex_options, target_for
from .output import emit_json, session_hex, workers_line
from .workers import Workers, ask_workers
from .zk import zookeeper

STATUS_COUNTERS = ('acquired', 'contended', 'released', 'unavailable', 'lost')


def four_letter(host: str, port: int, word: bytes, timeout: float,
                tls: Optional[dict]) -> str:
    """Send a ZooKeeper four-letter word and return the answer."""
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        if tls is not None:
            sock = _ssl_context(tls).wrap_socket(sock, server_hostname=host)
        sock.sendall(word)
        chunks = []
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        sock.close()
    return b''.join(chunks).decode('utf-8', 'replace')


def _ssl_context(tls: dict) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=tls.get('ca'))
    if tls.get('certfile'):
        context.load_cert_chain(tls['certfile'], tls.get('keyfile'), tls.get('keyfile_password'))
    verify = tls.get('verify_certs', True) is not False
    context.check_hostname = verify and bool(tls.get('check_hostname', False))
    if not verify:
        context.verify_mode = ssl.CERT_NONE
    return context


def _parse_srvr(text: str) -> dict:
    fields = {}
    for line in text.splitlines():
        name, colon, value = line.partition(':')
        if colon:
            fields[name.strip().lower()] = value.strip()
    zxid = fields.get('zxid')
    return {
        'mode': fields.get('mode'), 'zxid': int(zxid, 16) if zxid else None,
        'version': (fields.get('zookeeper version') or '').split('-')[0].split(',')[0] or None,
        'connections': _int(fields.get('connections')),
        'node_count': _int(fields.get('node count')),
        'latency': fields.get('latency min/avg/max'),
    }


def _int(value: Optional[str]) -> Optional[int]:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _host_string(host: str, port: int) -> str:
    return f'[{host}]:{port}' if ':' in host else f'{host}:{port}'


def probe_server(host: str, port: int, target: Target, timeout: float) -> dict:
    """One server: reachable? mode and zxid by ``srvr``, else through a session."""
    server = {'host': _host_string(host, port), 'reachable': False, 'mode': None,
              'zxid': None, 'via': None, 'error': None}
    try:
        text = four_letter(host, port, b'srvr', timeout, target.settings.tls)
    except OSError as exc:
        server['error'] = str(exc) or type(exc).__name__
        text = None
    if text and 'Mode:' in text:
        server.update(_parse_srvr(text), reachable=True, via='srvr')
        return server
    if text and 'not currently serving' in text:
        server.update(reachable=True, mode='not serving', via='srvr')
        return server
    if text is not None or target.settings.tls is not None:
        server['error'] = None
        server.update(_probe_by_session(host, port, target, timeout))
    return server


def _probe_by_session(host: str, port: int, target: Target, timeout: float) -> dict:
    """Fallback when ``srvr`` is not allowed: a session tells reachable and zxid."""
    try:
        with zookeeper(target, timeout, hosts=_host_string(host, port)) as client:
            client.sync('/')
            client.exists('/')
            return {'reachable': True, 'mode': 'unknown (srvr not allowed)',
                    'zxid': client.last_zxid, 'via': 'session'}
    except CeleryCommandException as exc:
        return {'reachable': False, 'error': exc.message}


def namespace_view(client: KazooClient, target: Target, opts: Options) -> dict:
    leases = read_leases(client, target, opts.zk_timeout)
    try:
        acls, _ = client.get_acls(target.namespace)
        acl = [f'{a.id.scheme}:{a.id.id}' for a in acls]
    except NoNodeError:
        acl = None
    except NoAuthError:
        acl = ['(not readable with these credentials)']
    session_id, _ = client.client_id
    return {'namespace': target.namespace, 'exists': acl is not None,
            'lease_count': len(leases), 'acl': acl, 'session_id': session_id,
            'sessions': _count_by_session(leases)}


def _count_by_session(leases: Sequence[LeaseNode]) -> Dict[int, int]:
    counts: Dict[int, int] = {}
    for lease in leases:
        counts[lease.session_id] = counts.get(lease.session_id, 0) + 1
    return counts


def worker_rows(workers: Workers, sessions: Dict[int, int]) -> List[dict]:
    rows = []
    for name, info in sorted(workers.replies.items()):
        counters = info.get('counters') or {}
        rows.append({
            'worker': name, 'session_id': info.get('session_id'),
            'state': info.get('session'), 'leases': len(info.get('leases') or ()),
            'leases_in_zookeeper': sessions.get(info.get('session_id'), 0),
            'waiting': len(info.get('waiting') or ()), 'counters': counters,
        })
    return rows


def render_status(data: dict) -> str:
    servers = data['zookeeper']['servers']
    lines = [f'ZooKeeper {data["zookeeper"]["hosts"]} (from {data["zookeeper"]["source"]}):']
    rows = [[s['host'], 'yes' if s['reachable'] else 'NO', s.get('mode') or '-',
             hex(s['zxid']) if isinstance(s.get('zxid'), int) else '-',
             s.get('version') or '-', str(s.get('connections') or '-'), s.get('error') or '']
            for s in servers]
    lines += ['  ' + line for line in table(
        ('SERVER', 'REACHABLE', 'MODE', 'ZXID', 'VERSION', 'CONNECTIONS', 'ERROR'),
        rows).splitlines()]
    ns = data.get('namespace')
    if ns is None:
        lines.append(f'Namespace: not read ({data.get("namespace_error")}).')
    else:
        acl = ', '.join(ns['acl']) if ns['acl'] else '-'
        lines.append(f'Namespace {ns["namespace"]}: {ns["lease_count"]} lease(s)'
                     + ('' if ns['exists'] else ' (not created yet)')
                     + f'; ACL {acl}; this command\'s session {session_hex(ns["session_id"])}.')
    lines.append(workers_line(data['_workers'], names=False))
    if data['workers']:
        rows = [[w['worker'], session_hex(w['session_id']), w['state'] or '?',
                 str(w['leases']), str(w['leases_in_zookeeper']), str(w['waiting']),
                 *(str(w['counters'].get(c, '-')) for c in STATUS_COUNTERS)]
                for w in data['workers']]
        lines += ['  ' + line for line in table(
            ('WORKER', 'SESSION', 'STATE', 'LEASES', 'IN ZK', 'WAITING',
             *(c.upper() for c in STATUS_COUNTERS)), rows).splitlines()]
    for name, error in sorted(data['workers_without_step'].items()):
        lines.append(f'  {name}: {error}')
    return '\n'.join(lines)


@click.command('status', cls=CeleryCommand)
@mutex_options
@click.pass_context
def status(ctx: click.Context, opts: Options) -> None:
    """The ZooKeeper servers (mode, zxid), the namespace, and each worker's session.

    Exit status 1 when some server does not serve, 69 when ZooKeeper cannot
    be used at all or the broker cannot be (see celery mutex --help).
    """
    app = ctx.obj.app
    target = target_for(app, opts)
    data = status_data(app, target, opts)
    if opts.as_json:
        emit_json({k: v for k, v in data.items() if not k.startswith('_')})
    else:
        ctx.obj.echo(render_status(data))
    servers = data['zookeeper']['servers']
    serving = [s for s in servers if s['reachable'] and s.get('mode') != 'not serving']
    ctx.exit(status_status(data['namespace'] is not None, len(servers), len(serving),
                           data['workers_error']))


def status_data(app: Any, target: Target, opts: Options) -> dict:
    hosts, chroot = collect_hosts(target.settings.hosts)
    servers = [probe_server(h, p, target, opts.zk_timeout) for h, p in hosts]
    data: Dict[str, Any] = {
        'zookeeper': {'hosts': target.settings.hosts, 'source': target.hosts_source,
                      'chroot': chroot, 'servers': servers},
        'namespace': None, 'namespace_error': None,
    }
    sessions: Dict[int, int] = {}
    try:
        with zookeeper(target, opts.zk_timeout) as client:
            data['namespace'] = namespace_view(client, target, opts)
            sessions = data['namespace'].pop('sessions')
    except CeleryCommandException as exc:
        data['namespace_error'] = exc.message
    workers = ask_workers(app, opts.timeout, opts.destination)
    data['_workers'] = workers
    data['workers'] = worker_rows(workers, sessions)
    data['workers_without_step'] = dict(workers.without_step)
    data['workers_error'] = workers.error
    return data
