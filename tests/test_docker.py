"""Static checks of docker/ (no Docker engine needed): the compose file and the Dockerfile.

One check imports the demo app in a subprocess the way its containers do (the Dockerfile's
environment and config module, the compose file's environment) to read what the workers
would use: the task queue's arguments and each guarded task's mutex_timeout. Nothing
connects to a service.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

yaml = pytest.importorskip('yaml')  # the test extra installs PyYAML

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKER_DIR = os.path.join(REPO_ROOT, 'docker')
COMPOSE = os.path.join(DOCKER_DIR, 'docker-compose.yml')
ZK_CLIENT_PORT = 2181


@pytest.fixture(scope='module')
def compose():
    with open(COMPOSE, encoding='utf-8') as f:
        data = yaml.safe_load(f)
    assert isinstance(data, dict) and isinstance(data.get('services'), dict)
    return data


@pytest.fixture(scope='module')
def services(compose):
    return compose['services']


def env_of(service):
    """A service's environment as a dict (compose allows a mapping or KEY=VALUE list)."""
    env = service.get('environment') or {}
    if isinstance(env, list):
        env = dict(item.split('=', 1) if '=' in item else (item, None) for item in env)
    return {k: (None if v is None else str(v)) for k, v in env.items()}


def command_of(service):
    cmd = service.get('command') or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def zookeeper_services(services):
    return {n: s for n, s in services.items()
            if str(s.get('image', '')).split(':')[0] == 'zookeeper'}


def worker_services(services):
    return {n: s for n, s in services.items() if 'worker' in command_of(s)}


def app_image(services):
    built = [s for s in services.values() if s.get('build')]
    assert len(built) == 1, 'the app image must be built by exactly one service'
    assert built[0].get('image'), 'the service that builds the app image must name it'
    return built[0]['image']


def app_services(services):
    image = app_image(services)
    return {n: s for n, s in services.items() if s.get('image') == image}


def build_context(service):
    build = service['build']
    context = build if isinstance(build, str) else build.get('context', '.')
    dockerfile = 'Dockerfile' if isinstance(build, str) else build.get('dockerfile', 'Dockerfile')
    context = os.path.normpath(os.path.join(DOCKER_DIR, context))
    return context, os.path.join(context, dockerfile)


def test_every_service_has_an_image_or_a_build(services):
    for name, service in services.items():
        assert service.get('image') or service.get('build'), name


def service_named(services, image_prefix):
    found = [n for n, s in services.items() if str(s.get('image', '')).startswith(image_prefix)]
    assert len(found) == 1, (image_prefix, found)
    return found[0]


def flower_service(services):
    found = [n for n, s in services.items() if 'flower' in command_of(s)]
    assert len(found) == 1, found
    return found[0]


def test_expected_services_and_images(services):
    zk = zookeeper_services(services)
    assert len(zk) == 3
    assert {s['image'] for s in zk.values()} == {'zookeeper:3.8'}
    images = {s.get('image') for s in services.values()}
    assert 'rabbitmq:4-management' in images
    assert any(str(i).startswith('redis') for i in images)
    assert len(worker_services(services)) == 2
    # Flower runs from the app's image (its own image brings an older Celery, whose event
    # queues RabbitMQ 4.3 refuses), with the app: `celery -A ... flower`.
    flower = services[flower_service(services)]
    assert flower['image'] == app_image(services)
    assert command_of(flower)[:3] == ['celery', '-A', 'examples.demoapp']


def parse_zoo_servers(value):
    """'server.1=zk1:2888:3888;2181 ...' -> {1: (host, quorum, election, client)}."""
    servers = {}
    for entry in value.split():
        m = re.fullmatch(r'server\.(\d+)=([^:;\s]+):(\d+):(\d+)(?::(?:participant|observer))?'
                         r'(?:;(?:[^:;\s]+:)?(\d+))?', entry)
        assert m, 'bad ZOO_SERVERS entry %r' % entry
        sid = int(m.group(1))
        assert sid not in servers, 'server.%d listed twice' % sid
        servers[sid] = (m.group(2), int(m.group(3)), int(m.group(4)),
                        int(m.group(5)) if m.group(5) else None)
    return servers


def test_zookeeper_ensemble_is_consistent(services):
    zk = zookeeper_services(services)
    ids = {}
    lists = {}
    for name, service in zk.items():
        env = env_of(service)
        assert env.get('ZOO_MY_ID', '').isdigit(), name
        ids[name] = int(env['ZOO_MY_ID'])
        lists[name] = parse_zoo_servers(env['ZOO_SERVERS'])
    assert sorted(ids.values()) == [1, 2, 3], ids
    first = next(iter(lists.values()))
    for name, servers in lists.items():
        # every node lists the same three servers ...
        assert servers == first, (name, servers, first)
        # ... and its own id names itself
        own_host = servers[ids[name]][0]
        assert own_host in (name, zk[name].get('hostname')), (name, own_host)
    # every listed host is one of the ZooKeeper services, with the client port
    hosts = {}
    for sid, (host, quorum, election, client) in first.items():
        owner = [n for n, s in zk.items() if host in (n, s.get('hostname'))]
        assert owner, 'server.%d=%s is not a ZooKeeper service' % (sid, host)
        assert ids[owner[0]] == sid
        assert client in (None, ZK_CLIENT_PORT)
        assert quorum != election
        hosts[sid] = host
    assert len(set(hosts.values())) == 3


def published_host_ports(service):
    """Host-side ports of a service's ``ports`` (short and long syntax)."""
    out = []
    for port in service.get('ports') or []:
        if isinstance(port, dict):
            if port.get('published') is not None:
                out.append((str(port.get('host_ip', '')), int(port['published']),
                            port.get('protocol', 'tcp')))
            continue
        text = str(port)
        proto = 'tcp'
        if '/' in text:
            text, proto = text.rsplit('/', 1)
        parts = text.rsplit(':', 2)
        if len(parts) == 1:
            continue  # container port only: Docker picks a free host port
        host_ip = parts[0] if len(parts) == 3 else ''
        published = parts[-2]
        start, _, end = published.partition('-')
        for p in range(int(start), int(end or start) + 1):
            out.append((host_ip, p, proto))
    return out


def test_published_ports_do_not_collide(services):
    seen = {}
    for name, service in services.items():
        for host_ip, port, proto in published_host_ports(service):
            for (other_ip, other_port, other_proto), other in seen.items():
                same_ip = host_ip == other_ip or '' in (host_ip, other_ip) or \
                    '0.0.0.0' in (host_ip, other_ip)
                assert not (same_ip and port == other_port and proto == other_proto), \
                    'port %d published by %s and %s' % (port, name, other)
            seen[(host_ip, port, proto)] = name
    flower = flower_service(services)
    assert any(p == 5555 for _, p, _ in published_host_ports(services[flower]))


def test_workers_name_all_zookeeper_nodes(services):
    zk = zookeeper_services(services)
    for name, service in worker_services(services).items():
        cmd = command_of(service)
        assert cmd[:4] == ['celery', '-A', 'examples.demoapp', 'worker'], (name, cmd)
        assert cmd.count('--mutex-hosts') == 1, (name, cmd)
        hosts = cmd[cmd.index('--mutex-hosts') + 1]
        entries = hosts.split('/')[0].split(',')
        assert sorted(entries) == sorted('%s:%d' % (n, ZK_CLIENT_PORT) for n in zk), hosts
        assert '-c' in cmd and cmd[cmd.index('-c') + 1] == '3'
        assert cmd[cmd.index('-P') + 1] == 'prefork'
        env = env_of(service)
        assert env.get('DEMO_BROKER', '').startswith('amqp://')
        assert '@rabbitmq:' in env['DEMO_BROKER']
        assert '//redis:' in env.get('DEMO_BACKEND', '')
        assert '//redis:' in env.get('DEMO_RECORD_URL', '')
    names = [c[c.index('-n') + 1] for c in map(command_of, worker_services(services).values())]
    assert len(set(names)) == len(names), names  # distinct node names


def test_depends_on_names_existing_services(services):
    for name, service in services.items():
        deps = service.get('depends_on') or []
        if isinstance(deps, dict):
            for dep, spec in deps.items():
                assert dep in services, (name, dep)
                assert spec.get('condition', 'service_started') in (
                    'service_started', 'service_healthy', 'service_completed_successfully')
                if spec.get('condition') == 'service_healthy':
                    assert services[dep].get('healthcheck'), (name, dep)
        else:
            for dep in deps:
                assert dep in services, (name, dep)
        assert name not in (deps if isinstance(deps, (list, dict)) else [])


def dockerfile_instructions(path):
    """(instruction, argument text) pairs, with line continuations joined."""
    with open(path, encoding='utf-8') as f:
        text = f.read()
    text = re.sub(r'\\\n', ' ', text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith('#'):
            word, _, rest = line.partition(' ')
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_copies_existing_files(services):
    built = [s for s in services.values() if s.get('build')]
    assert built
    for service in built:
        context, dockerfile = build_context(service)
        assert os.path.isfile(dockerfile), dockerfile
        instructions = dockerfile_instructions(dockerfile)
        assert instructions[0] == ('FROM', 'python:3.11-slim')
        copies = [rest for word, rest in instructions if word in ('COPY', 'ADD')]
        assert copies
        for rest in copies:
            args = [a for a in shlex.split(rest) if not a.startswith('--')]
            sources = args[:-1]
            assert sources, rest
            for src in sources:
                assert os.path.exists(os.path.join(context, src)), 'COPY source %s missing' % src
        run = ' '.join(rest for word, rest in instructions if word == 'RUN')
        assert 'pip install .' in run


def test_dockerignore_keeps_what_the_dockerfile_copies(services):
    """docker/Dockerfile.dockerignore (BuildKit) must not exclude a COPY source."""
    context, dockerfile = build_context(next(s for s in services.values() if s.get('build')))
    ignore = dockerfile + '.dockerignore'
    if not os.path.exists(ignore):
        pytest.skip('no Dockerfile-specific ignore file')
    with open(ignore, encoding='utf-8') as f:
        patterns = [p.strip() for p in f if p.strip() and not p.startswith('#')]
    kept = {p[1:].rstrip('/') for p in patterns if p.startswith('!')}
    for word, rest in dockerfile_instructions(dockerfile):
        if word == 'COPY':
            for src in shlex.split(rest)[:-1]:
                assert src.rstrip('/') in kept, src


# --------------------------------------------------------------------------- ZooKeeper health

def healthcheck_command(service):
    """A healthcheck's test as one shell text ('' when there is none or it is disabled)."""
    check = service.get('healthcheck') or {}
    if check.get('disable'):
        return ''
    test = check.get('test')
    if isinstance(test, str):
        return test
    if not test or test[0] == 'NONE':
        return ''
    if test[0] == 'CMD-SHELL':
        return ' '.join(test[1:])
    return ' '.join(shlex.quote(str(a)) for a in (test[1:] if test[0] == 'CMD' else test))


def four_letter_words(command):
    """The four-letter words a healthcheck sends ("echo srvr | nc ..."; zkServer.sh status
    asks srvr)."""
    words = set(re.findall(r'echo\s+[\'"]?([a-z]{4})[\'"]?\s*\|\s*(?:nc|ncat|netcat)\b', command))
    if re.search(r'zkServer\.sh\s+status', command):
        words.add('srvr')
    return words


def whitelist_of(service):
    value = env_of(service).get('ZOO_4LW_COMMANDS_WHITELIST') or 'srvr'  # the image's default
    return {w.strip() for w in value.split(',') if w.strip()}


def test_zookeeper_healthchecks_ask_whether_the_node_serves(services):
    for name, service in zookeeper_services(services).items():
        command = healthcheck_command(service)
        assert command, '%s has no healthcheck' % name
        words = four_letter_words(command)
        assert words, '%s: the healthcheck asks ZooKeeper nothing: %r' % (name, command)
        # ruok answers imok while the node is out of the quorum; srvr/mntr/stat tell
        # whether it serves (zkServer.sh status exits non-zero when it does not)
        assert words & {'srvr', 'mntr', 'stat'}, (name, command)
        if 'zkServer.sh' not in command:
            assert re.search(r'\bnc\b.*\b%d\b' % ZK_CLIENT_PORT, command), (name, command)
            # nc succeeds on any answer, "not currently serving requests" included: the
            # check must look for the mode
            assert re.search(r'grep\b.*(Mode|zk_server_state|leader|follower)', command), \
                (name, command)
        check = service['healthcheck']
        assert check.get('interval') and check.get('retries'), name


def test_four_letter_word_whitelist_allows_what_is_used(services):
    for name, service in zookeeper_services(services).items():
        allowed = whitelist_of(service)
        if '*' in allowed:
            continue
        used = four_letter_words(healthcheck_command(service))
        assert used <= allowed, '%s: healthcheck uses %s, whitelist %s' % (name, used, allowed)
        # `celery mutex status` reads each node's mode, zxid and connections with srvr
        assert 'srvr' in allowed, name


def test_zookeeper_nodes_keep_their_own_data(compose, services):
    declared = set(compose.get('volumes') or {})
    sources = {}
    for name, service in zookeeper_services(services).items():
        data = [str(v).split(':')[0] for v in service.get('volumes') or []
                if ':' in str(v) and str(v).split(':')[1] == '/data']
        assert len(data) == 1, (name, service.get('volumes'))
        sources[name] = data[0]
        if not data[0].startswith(('.', '/')):
            assert data[0] in declared, (name, data[0])
    # two nodes on one /data would share a myid
    assert len(set(sources.values())) == len(sources), sources


# --------------------------------------------------------------------------- RabbitMQ

def test_rabbitmq_4_with_a_healthcheck(services):
    rabbit = services[service_named(services, 'rabbitmq:')]
    tag = rabbit['image'].split(':', 1)[1]
    assert tag.split('.')[0].split('-')[0] == '4', rabbit['image']
    command = healthcheck_command(rabbit)
    assert 'rabbitmq-diagnostics' in command and 'ping' in command, command


def pinned_floor(text, package):
    m = re.search(r'["\']?%s>=(\d+)\.(\d+)' % re.escape(package), text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def test_image_celery_fits_rabbitmq_4(services):
    """rabbitmq:4-management follows 4.x: 4.3 refuses the transient non-exclusive queues
    (remote control, events) that Celery and kombu declared before 5.7; quorum queues need
    Celery 5.5 or later."""
    context, dockerfile = build_context(next(s for s in services.values() if s.get('build')))
    run = ' '.join(rest for word, rest in dockerfile_instructions(dockerfile) if word == 'RUN')
    assert (pinned_floor(run, 'celery') or (0, 0)) >= (5, 7), run
    assert (pinned_floor(run, 'kombu') or (0, 0)) >= (5, 7), run


# --------------------------------------------------------------------------- the app's containers

def test_one_image_for_every_worker(services):
    image = app_image(services)
    workers = worker_services(services)
    assert {s.get('image') for s in workers.values()} == {image}
    for name, service in app_services(services).items():
        if service.get('build'):
            assert service.get('pull_policy', 'missing') != 'never', name
        else:
            # the image exists only where it was built: never look for it on a registry
            assert service.get('pull_policy') == 'never', name
    # every container of the app (workers, client, Flower) runs that image
    for name, service in services.items():
        cmd = command_of(service)
        if 'examples.demoapp' in cmd:
            assert service.get('image') == image, name


def healthy_dependencies(service):
    deps = service.get('depends_on') or {}
    if isinstance(deps, list):
        return set()
    return {d for d, spec in deps.items() if (spec or {}).get('condition') == 'service_healthy'}


def test_workers_wait_for_healthy_zookeeper_and_broker(services):
    rabbit = service_named(services, 'rabbitmq:')
    redis_ = service_named(services, 'redis:')
    needed = set(zookeeper_services(services)) | {rabbit, redis_}
    for name, service in worker_services(services).items():
        missing = needed - healthy_dependencies(service)
        assert not missing, '%s does not wait for %s to be healthy' % (name, sorted(missing))
    for name, service in app_services(services).items():
        assert rabbit in healthy_dependencies(service), name


def test_the_client_does_not_start_zookeeper_nodes(services):
    """`docker compose run` starts the dependencies that are not running: the client that
    publishes must not bring back nodes stopped on purpose (docker/README.md)."""
    zk = set(zookeeper_services(services))
    for name, service in app_services(services).items():
        if service.get('profiles'):
            deps = service.get('depends_on') or {}
            assert not zk & set(deps), (name, sorted(zk & set(deps)))


def dockerfile_env(instructions):
    """ENV of a Dockerfile as a dict (KEY=VALUE pairs and the old ``ENV KEY VALUE``)."""
    env = {}
    for word, rest in instructions:
        if word != 'ENV':
            continue
        parts = shlex.split(rest)
        if parts and '=' not in parts[0]:
            env[parts[0]] = ' '.join(parts[1:])
            continue
        for part in parts:
            key, _, value = part.partition('=')
            env[key] = value
    return env


def copied_into_workdir(instructions, module):
    """The build-context source the Dockerfile copies to ``<WORKDIR>/<module>.py``."""
    workdir = '/'
    found = None
    for word, rest in instructions:
        if word == 'WORKDIR':
            workdir = os.path.join(workdir, rest)
        elif word in ('COPY', 'ADD'):
            args = [a for a in shlex.split(rest) if not a.startswith('--')]
            dest = os.path.normpath(os.path.join(workdir, args[-1]))
            for src in args[:-1]:
                target = os.path.join(dest, os.path.basename(src)) if args[-1].endswith('/') \
                    else dest
                if target == os.path.normpath(os.path.join(workdir, module + '.py')):
                    found = src
    return workdir, found


FACTS_SCRIPT = r'''
import importlib, json, sys
from celery_mutex_bootstep.options import MutexSettings, policy_for_task
app = importlib.import_module(sys.argv[1]).app
conf = app.conf
settings = MutexSettings.from_app(conf)
guarded = {}
for name, task in sorted(app.tasks.items()):
    policy = policy_for_task(task, settings)
    if policy is not None:
        guarded[name] = {'timeout': policy.timeout, 'republish_after': policy.republish_after}
print(json.dumps({
    'default_queue': conf.task_default_queue,
    'queues': {n: dict(q.queue_arguments or {}) for n, q in app.amqp.queues.items()},
    'mutex_hosts': conf.get('mutex_hosts'),
    'guarded': guarded,
}))
'''


@pytest.fixture(scope='module')
def worker_app(services, tmp_path_factory):
    """What a worker container's app is configured with, read by importing it as the
    container does: the Dockerfile's ENV, its config module copied where the Dockerfile
    copies it, the worker service's environment."""
    name, worker = sorted(worker_services(services).items())[0]
    context, dockerfile = build_context(services[next(
        n for n, s in services.items() if s.get('build'))])
    instructions = dockerfile_instructions(dockerfile)
    env = dict(dockerfile_env(instructions))
    env.update({k: v for k, v in env_of(worker).items() if v is not None})
    module = env.get('CELERY_CONFIG_MODULE')
    assert module, 'the image does not set CELERY_CONFIG_MODULE: the quorum queue is not loaded'
    workdir, source = copied_into_workdir(instructions, module)
    assert source, 'the Dockerfile does not copy %s.py into %s' % (module, workdir)
    assert workdir in env.get('PYTHONPATH', '').split(':'), (workdir, env.get('PYTHONPATH'))
    config_dir = tmp_path_factory.mktemp('image-workdir')
    shutil.copy(os.path.join(context, source), str(config_dir / (module + '.py')))
    cmd = command_of(worker)
    app_module = cmd[cmd.index('-A') + 1]
    run_env = dict(os.environ, **{k: v for k, v in env.items() if k != 'PYTHONPATH'})
    run_env['PYTHONPATH'] = os.pathsep.join([str(config_dir), REPO_ROOT])
    out = subprocess.run([sys.executable, '-c', FACTS_SCRIPT, app_module], env=run_env,
                         cwd=str(config_dir), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts['guarded'], 'the app %s guards no task' % app_module
    return facts


def test_task_queue_is_a_quorum_queue_with_a_delivery_limit(worker_app):
    queue = worker_app['default_queue']
    assert queue in worker_app['queues'], worker_app['queues']
    args = worker_app['queues'][queue]
    assert args.get('x-queue-type') == 'quorum', args
    limit = args.get('x-delivery-limit')
    assert isinstance(limit, int) and limit > 0, args
    # waiting messages are republished fresh after mutex_republish_after deliveries: that
    # must come before the broker drops them
    for task, policy in worker_app['guarded'].items():
        assert 0 < policy['republish_after'] < limit, (task, policy, limit)


def test_config_module_names_the_zookeeper_nodes_the_workers_use(services, worker_app):
    hosts = {command_of(s)[command_of(s).index('--mutex-hosts') + 1]
             for s in worker_services(services).values()}
    assert hosts == {worker_app['mutex_hosts']}, (hosts, worker_app['mutex_hosts'])


DURATION = re.compile(r'(\d+(?:\.\d+)?)(h|ms|us|m|s)')
UNITS = {'h': 3600, 'm': 60, 's': 1, 'ms': 1e-3, 'us': 1e-6}


def compose_duration(value):
    """Seconds of a compose duration ('45s', '1m30s', '1h'); Docker's default is 10 s."""
    if value is None:
        return 10.0
    text = str(value).strip()
    parts = DURATION.findall(text)
    assert parts and ''.join(n + u for n, u in parts) == text, 'bad duration %r' % value
    return sum(float(n) * UNITS[u] for n, u in parts)


def test_compose_duration():
    assert compose_duration('45s') == 45
    assert compose_duration('1m30s') == 90
    assert compose_duration('1h') == 3600
    assert compose_duration('500ms') == 0.5
    assert compose_duration(None) == 10


# Warm shutdown also waits up to 3 s for parks in flight, then stops the pool and closes
# the ZooKeeper session.
SHUTDOWN_MARGIN = 5


def test_stop_grace_period_lets_holders_finish(services, worker_app):
    longest = max(p['timeout'] for p in worker_app['guarded'].values())
    for name, service in worker_services(services).items():
        grace = compose_duration(service.get('stop_grace_period'))
        assert grace >= longest + SHUTDOWN_MARGIN, \
            '%s: stop_grace_period %gs < mutex_timeout %gs + %ds' % (
                name, grace, longest, SHUTDOWN_MARGIN)
