"""TLS to ZooKeeper through kazoo's SSL options (app config ``mutex_tls``)."""
import shutil
import subprocess

import pytest

from .records import overlaps
from .zkserver import find_free_port


@pytest.fixture
def tls_zk(zk_factory, tmp_path):
    if not shutil.which('openssl'):
        pytest.fail('openssl is needed to make the test certificate')
    key, cert = tmp_path / 'key.pem', tmp_path / 'cert.pem'
    subprocess.run(
        ['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', str(key),
         '-out', str(cert), '-days', '2', '-subj', '/CN=localhost',
         '-addext', 'subjectAltName=IP:127.0.0.1,DNS:localhost'],
        check=True, capture_output=True)
    server = tmp_path / 'server.pem'
    server.write_bytes(key.read_bytes() + cert.read_bytes())
    port = find_free_port()
    node = zk_factory(extra_config={
        'secureClientPort': port, 'secureClientPortAddress': '127.0.0.1',
        'serverCnxnFactory': 'org.apache.zookeeper.server.NettyServerCnxnFactory',
        'ssl.keyStore.location': str(server), 'ssl.keyStore.type': 'PEM',
        'ssl.trustStore.location': str(cert), 'ssl.trustStore.type': 'PEM',
        'ssl.clientAuth': 'none',
    })
    return node, f'127.0.0.1:{port}', cert


def test_worker_talks_tls_to_zookeeper(scenario, tls_zk):
    node, secure_hosts, cert = tls_zk
    s = scenario
    s.zk_hosts = node.hosts  # the test's own view: plain port of the same server
    s.worker('w1', concurrency=2, hosts=secure_hosts, env={'TEST_TLS_CA': str(cert)})
    handles = [s.send('work', 'tls', 0.3, i) for i in range(3)]
    assert sorted(h.get(timeout=30) for h in handles) == [0, 1, 2]
    runs = s.records.executions()
    assert len(runs) == 3 and overlaps(runs) == [] and all(r.token for r in runs)
    # the leases were taken in this server: the worker knew only its TLS port
    assert s.zk.exists(s.namespace)


def test_plain_client_cannot_use_the_tls_port(scenario, tls_zk):
    node, secure_hosts, cert = tls_zk
    s = scenario
    w = s.worker('w1', concurrency=2, hosts=secure_hosts)  # no TLS configured
    h = s.send('work', 'tls', 0, 1)
    from .scenario import wait_for
    wait_for(lambda: 'not reachable' in w.log_text(), timeout=30, message='the warning')
    assert s.records.count('start') == 0, 'never runs without its lease'
    w.stop()
    s.worker('w2', concurrency=2, hosts=secure_hosts, env={'TEST_TLS_CA': str(cert)})
    assert h.get(timeout=30) == 1, 'not lost'
