"""Quick real tests of the integration harness itself (ZooKeeper JVMs, CLI, workers)."""

import os
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from integration import zkserver
from integration.workers import REPO_ROOT

kazoo_client = pytest.importorskip('kazoo.client')
from kazoo.retry import KazooRetry  # noqa: E402


def _client(hosts, timeout=4.0):
    client = kazoo_client.KazooClient(
        hosts=hosts, timeout=timeout,
        connection_retry=KazooRetry(max_tries=-1, delay=0.1, max_delay=0.5))
    client.start(timeout=10)
    return client


def test_find_free_ports_distinct():
    ports = zkserver.find_free_ports(9)
    assert len(set(ports)) == 9
    assert 0 < zkserver.find_free_port() < 65536


def test_standalone_answers_srvr_and_mntr(zk):
    assert zk.is_running()
    assert zk.hosts == '127.0.0.1:%d' % zk.client_port
    assert 'Mode: standalone' in zk.four_letter('srvr')
    assert zk.mode() == 'standalone'
    stats = zk.mntr()
    assert stats['zk_server_state'] == 'standalone'
    assert isinstance(stats['zk_znode_count'], int)
    assert zk.four_letter('ruok') == 'imok'


def test_kazoo_create_and_delete(zk):
    client = _client(zk.hosts)
    try:
        path = '/harness/%s' % uuid.uuid4().hex
        client.ensure_path('/harness')
        client.create(path, b'v', ephemeral=True)
        assert client.get(path)[0] == b'v'
        assert zk.mntr()['zk_ephemerals_count'] >= 1
        client.delete(path)
        assert client.exists(path) is None
    finally:
        client.stop()
        client.close()


def test_pause_resume_restart_keep_data(tmp_path):
    node = zkserver.standalone(base_dir=str(tmp_path / 'zk'))
    client = _client(node.hosts)
    retry = KazooRetry(max_tries=-1, delay=0.1, max_delay=0.5, deadline=20)  # expiry too
    try:
        client.create('/kept', b'data')
        node.pause()
        assert node.is_running()
        assert node.mode() is None          # frozen: the probe times out
        node.resume()
        assert node.wait_ready(5) == 'standalone'
        node.restart()                      # same port, same data dir
        assert node.mode() == 'standalone'
        assert retry(client.get, '/kept')[0] == b'data'
        node.kill()
        assert not node.is_running() and node.mode() is None
        node.start()
        node.wait_ready()
        # Not asserted: that the session survives. A client that reconnects in the
        # ~50 ms between the JVM binding its port and serving gets no answer until its
        # connect timeout (the whole session timeout with one host), and then its
        # session has expired.
        assert retry(client.get, '/kept')[0] == b'data'
    finally:
        client.stop()
        client.close()
        node.close()
    assert not node.is_running()
    assert os.path.exists(node.dir)         # a caller-given base_dir is never removed


def test_standalone_temp_dir_removed_on_close():
    node = zkserver.standalone()
    directory = node.dir
    assert os.path.exists(os.path.join(directory, 'zoo.cfg'))
    node.close()
    assert not os.path.exists(directory)


def test_ensemble_leader_failover_and_rejoin(zk_ensemble):
    zk_ensemble.wait_ready()
    modes = sorted(zk_ensemble.modes().values())
    assert modes == ['follower', 'follower', 'leader']
    assert zk_ensemble.hosts.count(',') == 2
    client = _client(zk_ensemble.hosts)
    try:
        path = '/failover-%s' % uuid.uuid4().hex
        client.create(path, b'before')
        leader = zk_ensemble.leader()
        t0 = time.monotonic()
        leader.kill()
        new_leader = zk_ensemble.wait_for_leader(timeout=10, exclude=[leader])
        assert time.monotonic() - t0 < 10
        survivors = [n for n in zk_ensemble.nodes if n is not leader]
        deadline = time.monotonic() + 10
        while sorted(n.mode() or '' for n in survivors) != ['follower', 'leader']:
            assert time.monotonic() < deadline, zk_ensemble.modes()
            time.sleep(0.05)
        assert new_leader in survivors
        assert leader.mode() is None
        client.set(path, b'after')          # the client follows to a survivor
        leader.restart()
        assert leader.mode() == 'follower'
        zk_ensemble.wait_ready()
        assert client.get(path)[0] == b'after'
    finally:
        client.stop()
        client.close()


def test_cli_start_status_stop(tmp_path):
    directory = str(tmp_path / 'cli-zk')
    env = dict(os.environ, PYTHONPATH=REPO_ROOT)
    cli = [sys.executable, '-m', 'integration.zkserver']
    started = subprocess.run(cli + ['start', '--dir', directory], env=env, cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=60)
    try:
        assert started.returncode == 0, started.stderr
        hosts = started.stdout.strip()
        port = int(hosts.rsplit(':', 1)[1])
        assert hosts == '127.0.0.1:%d' % port
        pid = int(open(os.path.join(directory, 'zk.pid')).read())
        assert zkserver._pid_alive(pid)     # outlived the CLI process
        assert zkserver._parse_mode(zkserver._four_letter(port, 'srvr')) == 'standalone'
        again = subprocess.run(cli + ['start', '--dir', directory], env=env, cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=60)
        assert again.returncode == 0 and again.stdout.strip() == hosts  # idempotent
        status = subprocess.run(cli + ['status', '--dir', directory], env=env, cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0 and 'mode=standalone' in status.stdout
    finally:
        stopped = subprocess.run(cli + ['stop', '--dir', directory], env=env, cwd=REPO_ROOT,
                                 capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    assert not zkserver._pid_alive(pid)
    status = subprocess.run(cli + ['status', '--dir', directory], env=env, cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=30)
    assert status.returncode == 3


APP_TEMPLATE = '''
import os
import time
from celery import Celery

app = Celery('{name}', broker={broker!r}, backend={backend!r})
app.conf.task_default_queue = {queue!r}
app.conf.broker_connection_retry_on_startup = True


@app.task
def add(x, y):
    return x + y


@app.task
def pid():
    return os.getpid()
'''


@pytest.fixture
def harness_app(tmp_path, monkeypatch, rabbitmq_url, redis_url):
    """A throw-away Celery app module importable here and by the workers (with its
    own queue). Request it before worker_factory so the workers stop first."""
    name = 'harness_app_%s' % uuid.uuid4().hex[:8]
    app_dir = tmp_path / 'app'
    app_dir.mkdir()
    (app_dir / ('%s.py' % name)).write_text(textwrap.dedent(APP_TEMPLATE.format(
        name=name, broker=rabbitmq_url, backend=redis_url, queue=name)))
    monkeypatch.syspath_prepend(str(app_dir))
    module = __import__(name)
    yield name, module, {'PYTHONPATH': str(app_dir)}
    # request harness_app before worker_factory: the workers are gone by now
    with module.app.connection_for_write() as conn:
        conn.default_channel.queue_delete(name)
        conn.default_channel.exchange_delete(name)
    module.app.close()
    sys.modules.pop(name, None)


def test_worker_runs_tasks_then_warm_shutdown(harness_app, worker_factory):
    name, module, env = harness_app
    worker = worker_factory(name, concurrency=2, env=env)
    assert worker.is_running() and worker.returncode is None
    children = worker.child_pids()
    assert len(children) == 2
    assert set(worker.group_pids()) >= {worker.pid, *children}
    assert module.add.delay(2, 3).get(timeout=15) == 5
    assert module.pid.delay().get(timeout=15) in children
    assert 'ready.' in worker.log_text()
    worker.pause()
    worker.resume()
    assert module.add.delay(1, 1).get(timeout=15) == 2
    assert worker.stop(timeout=20) == 0
    assert worker.group_pids() == []


def test_worker_kill_then_kill_group(harness_app, worker_factory):
    name, module, env = harness_app
    worker = worker_factory(name, concurrency=2, env=env)
    children = worker.child_pids()
    worker.kill()
    assert worker.returncode == -9
    assert worker.last_children == children
    worker.kill_group()
    assert worker.group_pids() == []
    assert all(not zkserver._pid_alive(p) for p in children)


@pytest.mark.chaos_full
def test_ensemble_survives_repeated_leader_kills(zk_ensemble):
    client = _client(zk_ensemble.hosts)
    try:
        path = '/repeated-%s' % uuid.uuid4().hex
        client.create(path, b'0')
        for i in range(1, 6):
            leader = zk_ensemble.wait_for_leader()
            leader.kill()
            zk_ensemble.wait_for_leader(timeout=10, exclude=[leader])
            client.set(path, str(i).encode())
            leader.start()
            zk_ensemble.wait_ready(30)
        assert client.get(path)[0] == b'5'
    finally:
        client.stop()
        client.close()


def test_process_watch_sees_a_real_death_and_a_reused_pid(monkeypatch):
    from types import SimpleNamespace

    from integration import processwatch
    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
    try:
        watch = processwatch.ProcessWatch(lambda: [SimpleNamespace(pid=child.pid,
                                                                   hostname='w')])
        watch._scan()
        assert watch.died_at(child.pid) is None
        t_kill = time.time()
        child.kill()
        child.wait()
        watch._scan()
        assert watch.died_at(child.pid) >= t_kill
    finally:
        child.kill()
    # A pid that now belongs to a later process: the first one died, the new one is
    # watched in its own right (and an execution started after its birth finds it).
    real = processwatch.started
    me = os.getpid()
    watch = processwatch.ProcessWatch(lambda: [SimpleNamespace(pid=me, hostname='w')])
    watch._scan()
    first = watch.incarnations(me)
    reborn = time.time()  # a start time of now: another incarnation of this pid
    monkeypatch.setattr(processwatch, 'started', lambda pid: (
        reborn if pid == me else real(pid)))
    watch.born[first[0]] -= 10  # the first was born long before the second
    t_reuse = time.time()
    watch._scan()
    assert watch.died_at(me, at=t_reuse - 5) >= t_reuse, 'the first incarnation died'
    assert len(watch.incarnations(me)) == 2
    assert watch.died_at(me, at=time.time() + 10) is None, 'the second one lives'
