#!/bin/sh
# The compatibility run: the integration subset that covers the gate, the release
# paths, session loss, a broker restart and the CLI, on each older Celery/kombu/kazoo
# the README claims (the newest runs in `make test` itself). One virtualenv per version set, in
# .venv-compat/, rebuilt only when setup.py changes.
#
#   sh scripts/compat.sh CELERY:KOMBU:KAZOO ...      e.g. 5.3.6:5.3.7:2.9.0
set -euf  # -f: the test ids below hold [brackets], not globs

PYTHON3=${PYTHON3:-python3}
SUBSET="integration/test_gate.py integration/test_release.py integration/test_exclusion.py
        integration/test_command.py integration/test_faults.py::test_worker_cut_off_from_zookeeper_stops_its_holders_before_others_acquire
        integration/test_worker_faults.py::test_broker_reset_while_a_pool_process_has_the_request_but_not_yet_started_it
        integration/test_worker_faults.py::test_broker_connection_reset_releases_the_leases_of_dropped_requests
        integration/test_contention.py::test_quorum_queue_delivery_limit_loses_nothing
        integration/test_no_hoarding.py
        integration/test_broker_restart.py
        integration/test_hot_key.py::test_other_keys_do_not_wait_behind_a_hot_key[rabbitmq]
        integration/test_hot_key.py::test_parked_messages_survive_the_worker_that_parked_them"

for spec in "$@"; do
    celery=${spec%%:*}; rest=${spec#*:}; kombu=${rest%%:*}; kazoo=${rest#*:}
    venv=.venv-compat/celery-$celery
    if [ ! -f "$venv/.installed" ] || [ setup.py -nt "$venv/.installed" ] ||
            [ "$(cat "$venv/.spec" 2>/dev/null)" != "$spec" ]; then
        rm -rf "$venv"
        $PYTHON3 -m venv "$venv"
        # redis as those Celery versions pin it (celery[redis]): the tests' result
        # backend hangs in pubsub with a newer one.
        "$venv/bin/pip" install -q -e '.[test]' "celery==$celery" "kombu==$kombu" \
            "kazoo==$kazoo" 'redis>=4.5.2,<5.3'
        echo "$spec" > "$venv/.spec"
        touch "$venv/.installed"
    fi
    echo "== compat: $("$venv/bin/python" -c 'import sys, celery, kombu, kazoo; print("Python %d.%d.%d" % sys.version_info[:3], "celery", celery.__version__, "kombu", kombu.__version__, "kazoo", kazoo.version.__version__)')"
    skip=
    case $celery in
        # Celery before 5.5 cannot consume from a quorum queue at all (it asks for a
        # global QoS, which quorum queues refuse): nothing of the step's to test there.
        5.3.*|5.4.*) skip="--deselect integration/test_contention.py::test_quorum_queue_delivery_limit_loses_nothing
              --deselect integration/test_exclusion.py::test_quorum_delivery_count_rule_applies_when_a_lost_holder_is_handed_back" ;;
    esac
    # shellcheck disable=SC2086
    "$venv/bin/python" -m pytest -q -p no:cacheprovider $SUBSET $skip
done
