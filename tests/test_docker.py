"""Static checks of docker/ (no Docker engine needed): the compose file and the Dockerfile."""
import os
import re
import shlex

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
    assert command_of(flower)[:3] == ['celery', '-A', 'integration.demoapp']


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
        assert cmd[:4] == ['celery', '-A', 'integration.demoapp', 'worker'], (name, cmd)
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
