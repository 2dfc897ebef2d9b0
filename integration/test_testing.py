"""celery_mutex_bootstep.testing: the private ZooKeeper servers offered to users' tests.
Real JVMs (Debian's zookeeper package) and a real kazoo client."""
import os
import subprocess
import sys
import textwrap
import uuid

import psutil
import pytest
from kazoo.client import KazooClient
from kazoo.retry import KazooRetry

from celery_mutex_bootstep.testing import (ZooKeeperServer, zookeeper_ensemble,
                                           zookeeper_server)
from celery_mutex_bootstep.testing.zookeeper import ZOOKEEPER_JAR

pytestmark = pytest.mark.skipif(
    not os.path.exists(ZOOKEEPER_JAR) and not os.environ.get('ZOOKEEPER_CLASSPATH'),
    reason='needs Debian\'s zookeeper package (scripts/ensure-zookeeper.sh)')


def _client(hosts):
    client = KazooClient(hosts=hosts, timeout=4.0,
                         connection_retry=KazooRetry(max_tries=-1, delay=0.1, max_delay=0.5))
    client.start(timeout=10)
    return client


def test_zookeeper_server_serves_a_client_and_cleans_up():
    with zookeeper_server() as zk:
        assert isinstance(zk, ZooKeeperServer)
        pid, directory = zk.pid, zk.dir
        assert zk.mode() == 'standalone'
        client = _client(zk.hosts)
        try:
            path = '/t/%s' % uuid.uuid4().hex
            client.create(path, b'v', makepath=True, ephemeral=True)
            assert client.get(path)[0] == b'v'
        finally:
            client.stop()
            client.close()
        assert os.path.isdir(os.path.join(directory, 'data'))
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not os.path.exists(directory)  # the temporary data directory is gone
    assert zk.mode() is None              # nothing answers on its port any more


def test_stop_keeps_the_data_for_a_restart(tmp_path):
    with zookeeper_server(base_dir=tmp_path / 'zk') as zk:
        client = _client(zk.hosts)
        try:
            client.create('/kept', b'1')
            zk.restart()
            assert client.get('/kept')[0] == b'1'
        finally:
            client.stop()
            client.close()
    assert (tmp_path / 'zk' / 'data').is_dir()  # a directory the caller gave is kept


def test_ensemble_of_three_elects_a_leader():
    with zookeeper_ensemble(3) as ensemble:
        modes = sorted(ensemble.modes().values())
        assert modes == ['follower', 'follower', 'leader']
        client = _client(ensemble.hosts)
        try:
            client.create('/q', b'x')
            ensemble.leader().kill()
            ensemble.wait_for_leader(30)
            client.retry(client.get, '/q')
        finally:
            client.stop()
            client.close()
        pids = [n.pid for n in ensemble.nodes]
    assert all(not psutil.pid_exists(p) for p in pids if p)


def test_pytest_fixture_from_the_entry_point(tmp_path):
    # A user's test file, run in a fresh pytest process: the fixture comes from the
    # package's pytest11 entry point, nothing is imported by hand.
    (tmp_path / 'test_user.py').write_text(textwrap.dedent('''
        from kazoo.client import KazooClient

        def test_uses_it(mutex_zookeeper):
            client = KazooClient(hosts=mutex_zookeeper.hosts)
            client.start(timeout=10)
            client.create('/from-a-user-test', b'')
            client.stop()
            mutex_zookeeper.stop()          # a fault the next test must not see

        def test_serving_again(mutex_zookeeper):
            assert mutex_zookeeper.mode() == 'standalone'
    '''))
    proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                           'test_user.py'], cwd=tmp_path, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
    out = proc.stdout.decode('utf-8', 'replace')
    assert proc.returncode == 0 and '2 passed' in out, out
