from setuptools import find_packages, setup

with open('README.md', encoding='utf-8') as f:
    long_description = f.read()

setup(
    name='celery-mutex-bootstep',
    version='0.1.0',
    description=(
        'A Celery worker consumer bootstep that holds tasks to ZooKeeper '
        'mutexes before they reach the pool.'
    ),
    long_description=long_description,
    long_description_content_type='text/markdown',
    license='BSD-3-Clause',
    packages=find_packages(include=['celery_mutex_bootstep', 'celery_mutex_bootstep.*']),
    python_requires='>=3.9',
    install_requires=[
        'celery>=5.3,<6',
        'kombu>=5.3,<6',
        'kazoo>=2.9,<3',
        'click>=8.0',
    ],
    entry_points={
        'celery.commands': ['mutex = celery_mutex_bootstep.command:mutex'],
        # the mutex_zookeeper fixture (celery_mutex_bootstep.testing)
        'pytest11': ['celery_mutex_bootstep = celery_mutex_bootstep.testing.pytest_plugin'],
    },
    extras_require={
        'prometheus': ['prometheus-client>=0.16'],
        # `make demo` (examples/): the timeline picture, its records in Redis, its workers
        'demo': ['matplotlib>=3.5', 'redis>=4.5', 'psutil>=6.0'],
        'test': ['pytest>=7', 'hypothesis>=6', 'redis>=4.5', 'pyyaml>=5.4',
                 'prometheus-client>=0.16', 'psutil>=6.0',
                 'matplotlib>=3.5'],  # the demo's picture is tested too
    },
    classifiers=[
        'Framework :: Celery',
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3 :: Only',
        'Programming Language :: Python :: 3.9',
        'Programming Language :: Python :: 3.10',
        'Programming Language :: Python :: 3.11',
        'Programming Language :: Python :: 3.12',
        'Topic :: System :: Distributed Computing',
    ],
)
