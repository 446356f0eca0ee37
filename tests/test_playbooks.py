"""The playbooks' controller-side behaviour, run by the real ansible-playbook on this machine
(connection local, no become): what needs no cluster. The cluster itself is tests/molecule."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import redis

from distcomp.queue import Queue
from distcomp.redis_client import Redis
from distcomp.spec import parse_line
from tests.conftest import _pings
from tests.helpers import free_port, wait_for

REPO = Path(__file__).resolve().parent.parent
PLAYBOOK = Path(sys.executable).parent / "ansible-playbook"


# The prefix whose bin/distcomp the roles' runtime check finds: this test run's virtualenv.
VENV = str(Path(sys.executable).parent.parent)


def distcomp_cli(redis_server, namespace: str) -> list[str]:
    """The command line the roles run as ``__distcomp_cli``, pointed at the test's Redis."""
    return [sys.executable, "-m", "distcomp", "--redis", redis_server.url, "--namespace",
            namespace]


def playbook(*args: str, cwd: Path = REPO, command: Path = PLAYBOOK
             ) -> subprocess.CompletedProcess:
    env = {**os.environ, "ANSIBLE_ROLES_PATH": str(REPO / "roles"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_PYTHON_INTERPRETER": sys.executable}
    return subprocess.run([str(command), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, check=False)


# The oldest ansible-core the roles support (README.md): some of its output differs from 2.19's.
OLDEST_ANSIBLE = "2.15.13"


@pytest.fixture(scope="session")
def oldest_ansible() -> Path:
    """ansible-playbook of OLDEST_ANSIBLE, in a virtualenv of its own under .cache/ (made once,
    from PyPI)."""
    venv = REPO / ".cache" / f"ansible-core-{OLDEST_ANSIBLE}"
    command = venv / "bin" / "ansible-playbook"
    if not command.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                        f"ansible-core=={OLDEST_ANSIBLE}"], check=True, timeout=600)
    return command


def test_waiting_stops_at_its_last_round_with_what_to_do_next(redis_server, namespace, tmp_path):
    """submit.yml -e wait=true includes one round from the last; Ansible stops nesting includes
    after about 245 levels (a crash two hours into a wait), so the rounds stop at a cap, with a
    message. The cap is lowered to 3 here to see it reached."""
    q = Queue(Redis(redis_server.url), namespace)
    q.submit([parse_line(b"shell:0:0:1:sleep 1000")])
    assert q.register("w", "tok", 3_600_000, {"host": "h", "room_mb": 1024})[0]
    assert len(q.claim("w", "tok", 1024, 1, 1)) == 1  # running, and it will stay so
    (tmp_path / "wait.yml").write_text(
        "- hosts: localhost\n  connection: local\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.include_role:\n        name: distcomp\n        tasks_from: wait\n")
    cli = distcomp_cli(redis_server, namespace)
    extra = {"__distcomp_cli": cli, "distcomp_wait_interval": 0.05,
             "__distcomp_wait_max_rounds": 3, "ansible_become": False}
    run = playbook("-i", "localhost,", str(tmp_path / "wait.yml"), "-e", json.dumps(extra))
    out = run.stdout + run.stderr
    assert run.returncode != 0, out
    assert "Stopped following the queue after 3 rounds" in out, out
    assert "0 todo and 1 running keep going" in " ".join(out.split()), out
    assert out.count("0/1 done, 0 failed, 1 running, 0 todo") == 3, out



def test_queue_counts_say_when_queued_tasks_fit_no_live_worker(redis_server, namespace,
                                                               tmp_path):
    """A task asking for more cores than any worker has waits in todo for ever: status.yml and
    every round of submit.yml -e wait=true say so, not only `distcomp status`."""
    q = Queue(Redis(redis_server.url), namespace)
    q.submit([parse_line(b"shell:0:0:64:true big"), parse_line(b"shell:0:0:1:sleep 1000")])
    assert q.register("w", "tok", 3_600_000, {"host": "h", "room_mb": 1024, "cores": 2})[0]
    cli = distcomp_cli(redis_server, namespace)
    extra = {"__distcomp_cli": cli, "distcomp_venv_dir": VENV,
             "distcomp_wait_interval": 0.05, "__distcomp_wait_max_rounds": 1,
             "ansible_become": False}
    note = "1 queued need more memory or cores than any live worker offers"
    for tasks_from, line in (("status", "2 tasks: 2 to do, 0 running"),
                             ("wait", "0/2 done, 0 failed, 0 running, 2 todo, 1 workers")):
        (tmp_path / "play.yml").write_text(
            "- hosts: localhost\n  connection: local\n  gather_facts: false\n  tasks:\n"
            "    - ansible.builtin.include_role:\n        name: distcomp\n"
            f"        tasks_from: {tasks_from}\n")
        out = playbook("-i", "localhost,", str(tmp_path / "play.yml"), "-e",
                       json.dumps(extra)).stdout
        assert line in " ".join(out.split()), out
        assert note in " ".join(out.split()), out
    q.cancel([parse_line(b"shell:0:0:64:true big").task_id])
    out = playbook("-i", "localhost,", str(tmp_path / "play.yml"), "-e", json.dumps(extra)).stdout
    assert "1/2 done, 1 failed, 0 running, 1 todo, 1 workers" in " ".join(out.split()), out
    assert note not in " ".join(out.split()), out

def test_status_does_not_call_a_lost_worker_freshly_heard_from(redis_server, namespace,
                                                               tmp_path, client):
    """A worker whose lease ran out has no heartbeat age: status.yml printed it as
    "heartbeat 0.0s ago", a dead worker looking like the one heard from last."""
    q = Queue(Redis(redis_server.url), namespace)
    assert q.register("gone", "tok", 1000, {"host": "h", "room_mb": 1024, "cores": 2})[0]
    assert q.register("here", "tok", 3_600_000, {"host": "h", "room_mb": 1024, "cores": 2,
                                                 "ttl_ms": 3_600_000})[0]
    wait_for(lambda: not client.exists(q.key("lease", "gone")), 30, "the lease to run out")
    (tmp_path / "play.yml").write_text(
        "- hosts: localhost\n  connection: local\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.include_role:\n        name: distcomp\n"
        "        tasks_from: status\n")
    extra = {"__distcomp_cli": distcomp_cli(redis_server, namespace), "distcomp_venv_dir": VENV,
             "ansible_become": False}
    run = playbook("-i", "localhost,", str(tmp_path / "play.yml"), "-e", json.dumps(extra))
    assert run.returncode == 0, run.stdout
    out = " ".join(run.stdout.split())
    assert re.search(r"gone: LOST, [^']*heartbeat none since its lease ran out'", out), out
    assert re.search(r"here: alive, [^']*heartbeat \d+\.\ds ago'", out), out


def test_a_playbook_run_against_an_inventory_without_a_manager_stops(tmp_path):
    """Otherwise the play on manager[0] matches nothing, Ansible only warns, and the run exits
    0 as if the tasks were queued."""
    (tmp_path / "hosts.yml").write_text("all:\n  hosts: {}\n")
    (tmp_path / "tasks.txt").write_text("shell:0:0:1:true\n")
    for book in ("site.yml", "submit.yml", "status.yml", "results.yml", "teardown.yml"):
        run = playbook("-i", str(tmp_path / "hosts.yml"), book, "-e",
                       f"taskfile={tmp_path / 'tasks.txt'}")
        assert run.returncode != 0, (book, run.stdout)
        assert "No host in group 'manager' in the inventory" in run.stdout, (book, run.stdout)


def test_a_run_limited_to_a_worker_still_knows_the_managers_address(tmp_path):
    """The manager's experiment address comes from its facts (inventory/cloudlab/group_vars), so
    `site.yml --limit node1`, which gathers none of the manager's, pointed the worker at ''. Two
    local hosts stand in for the manager and the worker; this machine's network is the LAN."""
    address, network = _this_machines_network()
    inventory = tmp_path / "inventory"
    (inventory / "group_vars").mkdir(parents=True)
    group_vars = (REPO / "inventory/cloudlab/group_vars/all.yml").read_text()
    (inventory / "group_vars/all.yml").write_text(
        group_vars.replace("distcomp_experiment_network: 10.10.1.0/24",
                           f"distcomp_experiment_network: {network}")
        .replace("ansible_python_interpreter: /usr/bin/python3",
                 f"ansible_python_interpreter: {sys.executable}"))
    (inventory / "hosts.yml").write_text(
        "manager:\n  hosts:\n    m: {ansible_connection: local}\n"
        "workers:\n  hosts:\n    w: {ansible_connection: local}\n")
    (tmp_path / "play.yml").write_text(
        "- hosts: all\n  tasks:\n"
        "    - ansible.builtin.include_role:\n        name: common\n"
        "        tasks_from: manager_facts\n"
        "    - ansible.builtin.debug:\n        msg: 'manager at [{{ distcomp_manager_address }}]'\n")
    run = playbook("-i", str(inventory), "--limit", "w", str(tmp_path / "play.yml"))
    assert run.returncode == 0, run.stdout
    assert f"manager at [{address}]" in run.stdout, run.stdout


def _this_machines_network() -> tuple[str, str]:
    """The first non-loopback IPv4 address of this machine and its network in CIDR form."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"],
                         capture_output=True, text=True, check=True).stdout
    iface = ipaddress.ip_interface(out.split()[3])
    return str(iface.ip), str(iface.network)


def _worker_unit(tmp_path: Path, memory_max: str = "",
                 **settings: str) -> subprocess.CompletedProcess:
    """The distcomp role's preflight checks, then its unit file rendered into ``tmp_path``, for
    a worker with ``distcomp_worker_memory_max`` set to ``memory_max`` and the other role
    variables in ``settings``."""
    (tmp_path / "play.yml").write_text(
        "- hosts: localhost\n  connection: local\n  tasks:\n"
        "    - ansible.builtin.include_role:\n        name: distcomp\n"
        "        tasks_from: preflight\n        public: true\n"
        "    - ansible.builtin.template:\n"
        f"        src: {REPO}/roles/distcomp/templates/distcomp-worker.service.j2\n"
        f"        dest: {tmp_path}/distcomp-worker.service\n        mode: '0644'\n")
    extra = {"distcomp_worker_memory_max": memory_max, "distcomp_redis_host": "10.10.1.1",
             "distcomp_redis_password": "not-a-secret", "distcomp_worker_name": "node1",
             "distcomp_results_dir": str(tmp_path), "distcomp_worker_cores": "2", **settings}
    return playbook("-i", "localhost,", str(tmp_path / "play.yml"), "-e", json.dumps(extra))


def test_a_memory_ceiling_lands_in_the_worker_unit_only_when_set(tmp_path):
    """The worker takes its capacity from its cgroup, so the ceiling is the unit's MemoryMax=
    (tests/molecule fills it until the worker evicts); without one the unit has no line."""
    for value, line in (("768M", "MemoryMax=768M"), ("80%", "MemoryMax=80%"), ("", None)):
        run = _worker_unit(tmp_path, value)
        assert run.returncode == 0, run.stdout
        unit = (tmp_path / "distcomp-worker.service").read_text()
        assert [x for x in unit.splitlines() if x.startswith("MemoryMax")] == \
            ([line] if line else []), unit


def test_the_worker_unit_restarts_without_a_start_limit_and_keeps_tasks_out_of_homes(tmp_path):
    """A worker exits when Redis is away at its start; with distcomp_worker_restart_sec of 2 s
    or less, systemd's default limit (5 starts in 10 s) left it down for good once Redis came
    back late at a boot. (Molecule reads both properties from systemd itself.)"""
    run = _worker_unit(tmp_path, distcomp_worker_restart_sec=1)
    assert run.returncode == 0, run.stdout
    unit = (tmp_path / "distcomp-worker.service").read_text()
    sections: dict[str, list[str]] = {}
    for line in unit.splitlines():
        if line.startswith("["):
            current = sections.setdefault(line, [])
        elif line and not line.startswith("#") and sections:
            current.append(line)
    assert "StartLimitIntervalSec=0" in sections["[Unit]"], unit
    assert "ProtectHome=read-only" in sections["[Service]"], unit


def test_the_workers_tmpdir_is_the_nodes_scratch_directory(tmp_path):
    """Tasks wrote their temporary files to the root file system (a few GB on CloudLab) while
    the common role's scratch directory on the extra disk went unused."""
    for fact, line in (("/mydata/distcomp-scratch", "Environment=TMPDIR=/mydata/distcomp-scratch"),
                       (None, None)):
        run = _worker_unit(tmp_path, **({"common_scratch_dir": fact} if fact else {}))
        assert run.returncode == 0, run.stdout
        unit = (tmp_path / "distcomp-worker.service").read_text()
        assert [x for x in unit.splitlines() if "TMPDIR" in x and not x.startswith("#")] == \
            ([line] if line else []), unit


def test_a_memory_ceiling_systemd_would_not_read_stops_the_run(tmp_path):
    for value in ("768MB", "0.5G", "150%", "lots"):
        run = _worker_unit(tmp_path, value)
        assert run.returncode != 0, (value, run.stdout)
        assert f"distcomp_worker_memory_max ({value}) must be empty, bytes" in run.stdout, \
            run.stdout
        assert not (tmp_path / "distcomp-worker.service").exists()


def test_a_memory_ceiling_too_small_to_run_in_stops_the_run(tmp_path):
    """MemoryMax=4096 is 4 KiB: the kernel killed the worker as it started, systemd restarted
    it for ever, and site.yml reported success."""
    for value, size in (("4096", 4096), ("0", 0), ("1K", 1024), ("63M", 63 << 20)):
        run = _worker_unit(tmp_path, value)
        assert run.returncode != 0, (value, run.stdout)
        assert f"distcomp_worker_memory_max ({value}) is {size} bytes, too little" in \
            " ".join(run.stdout.split()), run.stdout
        assert not (tmp_path / "distcomp-worker.service").exists()
    for value in ("64M", "67108864", "2G", "1T", "1%"):
        assert _worker_unit(tmp_path, value).returncode == 0, value


@pytest.mark.parametrize("variable, good, bad", [
    ("distcomp_worker_memory_limit", ["1.5g", "512MiB", "0", "16777216"],
     ["lots", "-1G", "4096"]),
    ("distcomp_worker_heartbeat_ttl", [1, 30], [0, -5]),
    ("distcomp_worker_max_tasks", [0, 8], [-1]),
    ("distcomp_worker_default_timeout", [0, 600], [-1]),
    ("distcomp_worker_memory_reserve", ["256M"], ["5%"]),
    ("distcomp_worker_evict_below", ["128m"], ["half"]),
    ("distcomp_worker_overcommit", ["AUTO", "0.25", "4"], ["5", "x2"]),
    ("distcomp_namespace", ["exp-1.b_2"], ["exp 1", ""]),
])
def test_worker_settings_the_runtime_would_refuse_stop_site_yml(tmp_path, variable, good, bad):
    """The runtime refuses these at the worker's start, where systemd restarts it for ever and
    site.yml had reported success: the role checks them first, with the runtime's rules."""
    for value in good:
        run = _worker_unit(tmp_path, **{variable: value})
        assert run.returncode == 0, (value, run.stdout)
    for value in bad:
        run = _worker_unit(tmp_path, **{variable: value})
        assert run.returncode != 0, (value, run.stdout)
        assert f"{variable} ({value})" in run.stdout, run.stdout


def test_following_the_queue_works_in_check_mode(redis_server, namespace, tmp_path):
    """submit.yml --check -e wait=true read the queue with commands check mode skipped, and
    parsed their empty output."""
    (tmp_path / "wait.yml").write_text(
        "- hosts: localhost\n  connection: local\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.include_role:\n        name: distcomp\n        tasks_from: wait\n")
    cli = distcomp_cli(redis_server, namespace)
    extra = {"__distcomp_cli": cli, "distcomp_wait_interval": 0.05, "ansible_become": False}
    run = playbook("-i", "localhost,", "--check", str(tmp_path / "wait.yml"), "-e",
                   json.dumps(extra))
    assert run.returncode == 0, run.stdout
    assert "0/0 done, 0 failed, 0 running, 0 todo, 0 workers" in run.stdout, run.stdout


def test_teardown_leaves_a_moosefs_it_was_told_not_to_manage(tmp_path):
    """With moosefs_enabled false, site.yml installs and changes nothing of MooseFS; teardown.yml
    unmounted it, stopped its daemons and with purge deleted its chunks. Run in check mode."""
    (tmp_path / "play.yml").write_text(
        "- hosts: localhost\n  connection: local\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.include_role:\n        name: moosefs\n"
        "        tasks_from: teardown\n")
    run = playbook("-i", "localhost,", "--check", str(tmp_path / "play.yml"), "-e",
                   json.dumps({"moosefs_enabled": False, "moosefs_teardown_purge": True}))
    assert run.returncode == 0, run.stdout
    assert "TASK [moosefs : " not in run.stdout.replace(
        "TASK [moosefs : Validating arguments", ""), run.stdout


def test_a_password_and_port_given_to_the_redis_role_are_the_workers_too(tmp_path):
    """Two knobs held the one password: setting redis_requirepass (or redis_password_file) in
    the inventory alone gave Redis one password and every worker another. The same for the
    port: with redis_port 6380 every worker called 6379 and restarted for ever."""
    (tmp_path / "play.yml").write_text(
        "- hosts: localhost\n  connection: local\n  tasks:\n"
        "    - ansible.builtin.include_role:\n        name: distcomp\n"
        "        tasks_from: preflight\n        public: true\n"
        "    - ansible.builtin.template:\n"
        f"        src: {REPO}/roles/distcomp/templates/distcomp.conf.j2\n"
        f"        dest: {tmp_path}/distcomp.conf\n        mode: '0600'\n")
    (tmp_path / "pw").write_text("from-the-file\n")
    base = {"distcomp_redis_host": "10.10.1.1", "distcomp_worker_name": "node1",
            "distcomp_results_dir": str(tmp_path), "distcomp_worker_cores": "2"}
    for given, password, port in (
            ({"redis_requirepass": "from-the-redis-role", "redis_port": 6380},
             "from-the-redis-role", 6380),
            ({"redis_password_file": str(tmp_path / "pw")}, "from-the-file", 6379)):
        run = playbook("-i", "localhost,", str(tmp_path / "play.yml"), "-e",
                       json.dumps({**base, **given}))
        assert run.returncode == 0, run.stdout
        conf = (tmp_path / "distcomp.conf").read_text()
        assert f"password = {password}\n" in conf
        assert f"url = redis://10.10.1.1:{port}/0\n" in conf, conf
        assert password not in run.stdout


@pytest.mark.parametrize("oldest", [False, True], ids=["ansible-core 2.19", "the oldest"])
@pytest.mark.parametrize("role, variable, password, told", [
    ("redis", "redis_requirepass", "short pw", "redis_requirepass must be at least 16 characters"),
    ("distcomp", "distcomp_redis_password", "has a space in it",
     "distcomp_redis_password must be non-empty, without white space"),
])
def test_a_password_refused_says_why_without_showing_it(tmp_path, role, variable, password,
                                                        told, oldest, request):
    """The password checks ran with no_log, which hid their own message up to ansible-core 2.18:
    a refused password printed only that the output had been hidden."""
    (tmp_path / "play.yml").write_text(
        "- hosts: localhost\n  connection: local\n  gather_facts: false\n  tasks:\n"
        f"    - ansible.builtin.include_role:\n        name: {role}\n"
        "        tasks_from: preflight\n")
    extra = {variable: password, "redis_bind_addresses": ["127.0.0.1"],
             "redis_password_file": "secrets/redis_password", "distcomp_redis_host": "10.10.1.1",
             "distcomp_worker_name": "node1", "distcomp_results_dir": str(tmp_path),
             "distcomp_worker_cores": "2"}
    command = request.getfixturevalue("oldest_ansible") if oldest else PLAYBOOK
    run = playbook("-i", "localhost,", str(tmp_path / "play.yml"), "-e", json.dumps(extra),
                   command=command)
    assert run.returncode != 0, run.stdout
    assert told in run.stdout, run.stdout
    assert password not in run.stdout + run.stderr


def test_the_service_account_is_the_common_roles(tmp_path):
    """Both roles make the account, each from its own variables: a uid set for one of them only
    had every run change the account back and forth (usermod, then usermod again)."""
    (tmp_path / "play.yml").write_text(
        "- hosts: localhost\n  connection: local\n  tasks:\n"
        "    - ansible.builtin.include_role:\n        name: distcomp\n"
        "        tasks_from: preflight\n        public: true\n"
        "    - ansible.builtin.debug:\n        msg: 'account {{ distcomp_user }} "
        "{{ distcomp_uid }}:{{ distcomp_gid }} {{ distcomp_home }}'\n")
    base = {"distcomp_redis_host": "10.10.1.1", "distcomp_redis_password": "not-a-secret",
            "distcomp_worker_name": "node1", "distcomp_results_dir": str(tmp_path),
            "distcomp_worker_cores": "2"}
    common = {"common_user": "sim", "common_user_uid": 900, "common_group_gid": 901,
              "common_user_home": "/srv/sim", "common_group": "sim"}
    run = playbook("-i", "localhost,", str(tmp_path / "play.yml"), "-e",
                   json.dumps({**base, **common}))
    assert run.returncode == 0, run.stdout
    assert "account sim 900:901 /srv/sim" in run.stdout, run.stdout
    run = playbook("-i", "localhost,", str(tmp_path / "play.yml"), "-e",
                   json.dumps({**base, **common, "distcomp_uid": 902}))
    assert run.returncode != 0, run.stdout
    assert "distcomp_uid (902) differs from the common role's common_user_uid (900), the same " \
        "account: set common_user_uid alone" in " ".join(run.stdout.split()), run.stdout


def test_one_moosefs_master_on_the_first_host_of_its_group(tmp_path):
    """Every host of moosefs_master_group got a master, while chunkservers and clients were
    pointed at the first one only."""
    (tmp_path / "hosts.yml").write_text(
        "manager:\n  hosts:\n    m1: {ansible_connection: local}\n"
        "    m2: {ansible_connection: local}\n")
    (tmp_path / "play.yml").write_text(
        "- hosts: manager\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.include_role:\n        name: moosefs\n"
        "        tasks_from: preflight\n        public: true\n"
        "    - ansible.builtin.debug:\n        msg: 'master on {{ inventory_hostname }}: "
        "{{ __moosefs_is_master }}'\n")
    extra = {"distcomp_node_address": "10.10.1.1", "distcomp_experiment_network": "10.10.1.0/24",
             "ansible_python_interpreter": sys.executable}
    run = playbook("-i", str(tmp_path / "hosts.yml"), str(tmp_path / "play.yml"), "-e",
                   json.dumps(extra))
    assert run.returncode == 0, run.stdout
    assert "master on m1: True" in run.stdout and "master on m2: False" in run.stdout, run.stdout


def test_every_role_default_is_documented_by_its_argument_spec():
    """A role's defaults file and its argument spec both state each literal default; they had
    drifted (the spec gave none for the wheel lists, and results.yml's variables had no spec at
    all, so nothing typed or documented them). A templated default is the spec's to describe."""
    import yaml

    for role in sorted(p.name for p in (REPO / "roles").iterdir()):
        defaults = yaml.safe_load((REPO / "roles" / role / "defaults" / "main.yml").read_text())
        specs = yaml.safe_load((REPO / "roles" / role / "meta" / "argument_specs.yml")
                               .read_text())["argument_specs"]
        specified = {}
        for entry, spec in specs.items():
            for name, option in (spec.get("options") or {}).items():
                specified.setdefault(name, []).append((entry, option))
        for name, value in defaults.items():
            assert name in specified, f"{role}: {name} is in no entry point's argument spec"
            if "{{" in json.dumps(value):
                continue
            for entry, option in specified[name]:
                assert option.get("default") == value, (
                    f"{role} {entry}: {name} defaults to {value!r}, its spec says "
                    f"{option.get('default')!r}")


def _submit_inventory(tmp_path: Path, redis_server, namespace: str) -> tuple[Path, dict]:
    """This machine as the manager, its distcomp the test's: what submit.yml needs."""
    hosts = tmp_path / "hosts.yml"
    hosts.write_text("manager:\n  hosts:\n    localhost:\n      ansible_connection: local\n"
                     f"      ansible_python_interpreter: {sys.executable}\n")
    (tmp_path / "spool").mkdir()
    cli = distcomp_cli(redis_server, namespace)
    extra = {"__distcomp_cli": cli, "distcomp_venv_dir": VENV,
             "distcomp_spool_dir": str(tmp_path / "spool"), "distcomp_user": "root",
             "distcomp_group": "root", "ansible_become": False}
    return hosts, extra


def test_submits_at_once_of_files_with_one_name_each_queue_their_own(redis_server, namespace,
                                                                     tmp_path):
    """The manager's copy was named after the file alone: exp1/tasks.txt and exp2/tasks.txt
    submitted together copied over each other, and one run queued the other's tasks and said
    "0 tasks added" with success. The copies stayed on the manager for ever, too."""
    hosts, extra = _submit_inventory(tmp_path, redis_server, namespace)
    runs = []
    for exp in ("exp1", "exp2"):
        (tmp_path / exp).mkdir()
        (tmp_path / exp / "tasks.txt").write_text(
            "".join(f"shell:0:0:1:echo {exp} {i}\n" for i in range(2000)))
        env = {**os.environ, "ANSIBLE_ROLES_PATH": str(REPO / "roles"), "ANSIBLE_NOCOLOR": "1"}
        runs.append(subprocess.Popen(
            [str(PLAYBOOK), "-i", str(hosts), "submit.yml", "-e", json.dumps(extra), "-e",
             f"taskfile={tmp_path / exp / 'tasks.txt'}"], cwd=REPO, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for run in runs:
        out = run.communicate(timeout=300)[0]
        assert run.returncode == 0, out
        assert "2000 tasks added, 0 already in the queue" in out, out
    assert Queue(Redis(redis_server.url), namespace).counts()["todo"] == 4000
    assert list((tmp_path / "spool").iterdir()) == []


def test_submit_says_what_it_did_not_queue_and_why(redis_server, namespace, tmp_path):
    hosts, extra = _submit_inventory(tmp_path, redis_server, namespace)
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("shell:0:0:1:echo a\nshell:0:0:1:echo a\nshell:0:0:1:echo b\n")
    run = playbook("-i", str(hosts), "submit.yml", "-e", json.dumps(extra), "-e",
                   f"taskfile={tasks}")
    assert run.returncode == 0, run.stdout
    assert ("2 tasks added, 0 already in the queue, 1 lines repeating an earlier line: the same "
            "task, run once") in " ".join(run.stdout.split()), run.stdout
    tasks.write_text("shell:0:0:1:echo a\nshell:0:0:1:echo c\n")
    run = playbook("-i", str(hosts), "submit.yml", "-e", json.dumps(extra), "-e",
                   f"taskfile={tasks}")
    assert ("1 tasks added, 1 already in the queue (left as they are: a failed one stays failed "
            "until `distcomp retry`)") in " ".join(run.stdout.split()), run.stdout


@pytest.mark.parametrize("given, message", [
    ({"wait": "ture"}, "wait=ture is not true or false"),
    ({"wait": "true", "distcomp_wait_interval": "0"},
     "distcomp_wait_interval=0 is not a number of seconds above 0"),
    ({"wait": "true", "distcomp_wait_timeout": "1h"},
     "distcomp_wait_timeout=1h is not a number of seconds (0: no limit)"),
])
def test_a_bad_way_to_wait_stops_submit_before_anything_is_queued(redis_server, namespace,
                                                                  tmp_path, given, message):
    hosts, extra = _submit_inventory(tmp_path, redis_server, namespace)
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("shell:0:0:1:echo a\n")
    run = playbook("-i", str(hosts), "submit.yml", "-e", json.dumps(extra), "-e",
                   f"taskfile={tasks}", *[a for k, v in given.items() for a in ("-e", f"{k}={v}")])
    assert run.returncode != 0, run.stdout
    assert message in run.stdout, run.stdout
    assert Queue(Redis(redis_server.url), namespace).counts()["total"] == 0
    if given.get("wait") == "true":
        # Without wait=true the same settings are not used, and stopped every plain submit.
        run = playbook("-i", str(hosts), "submit.yml", "-e", json.dumps(extra), "-e",
                       f"taskfile={tasks}", *[a for k, v in given.items() if k != "wait"
                                              for a in ("-e", f"{k}={v}")])
        assert run.returncode == 0, run.stdout
        assert Queue(Redis(redis_server.url), namespace).counts()["total"] == 1


def test_queue_counts_say_when_no_worker_is_alive(redis_server, namespace, tmp_path):
    """status.yml and each round of submit.yml -e wait=true said "2 todo, 0 workers" and, with a
    timeout, that the tasks keep running, where `distcomp status` said that nothing runs them."""
    q = Queue(Redis(redis_server.url), namespace)
    q.submit([parse_line(b"shell:0:0:1:sleep 1000"), parse_line(b"shell:0:0:1:true")])
    cli = distcomp_cli(redis_server, namespace)
    extra = {"__distcomp_cli": cli, "distcomp_venv_dir": VENV,
             "distcomp_wait_interval": 0.05, "__distcomp_wait_max_rounds": 1,
             "ansible_become": False}
    for tasks_from in ("status", "wait"):
        (tmp_path / "play.yml").write_text(
            "- hosts: localhost\n  connection: local\n  gather_facts: false\n  tasks:\n"
            "    - ansible.builtin.include_role:\n        name: distcomp\n"
            f"        tasks_from: {tasks_from}\n")
        out = " ".join(playbook("-i", "localhost,", str(tmp_path / "play.yml"), "-e",
                                json.dumps(extra)).stdout.split())
        assert "no live worker: queued tasks wait until one starts" in out, out


def _redis_conf(tmp_path: Path, version: str | None, port: int = 6379) -> Path:
    """redis.conf as the redis role writes it, into ``tmp_path``, on a node whose
    ``redis-server --version`` prints ``version`` (None: this machine's redis-server)."""
    path = os.environ["PATH"]
    if version is not None:
        stub = tmp_path / "bin" / "redis-server"
        stub.parent.mkdir(exist_ok=True)
        stub.write_text(f"#!/bin/sh\necho 'Redis server v={version} sha=00000000:0 bits=64'\n")
        stub.chmod(0o755)
        path = f"{stub.parent}:{path}"
    (tmp_path / "play.yml").write_text(
        "- hosts: localhost\n  connection: local\n"
        f"  environment:\n    PATH: {path}\n  tasks:\n"
        "    - ansible.builtin.include_role:\n        name: redis\n"
        "        tasks_from: disabled_commands\n        public: true\n"
        "    - ansible.builtin.template:\n"
        f"        src: {REPO}/roles/redis/templates/redis.conf.j2\n"
        f"        dest: {tmp_path}/redis.conf\n        mode: '0600'\n")
    extra = {"redis_bind_addresses": ["127.0.0.1"], "redis_port": port, "redis_dir": str(tmp_path),
             "redis_requirepass": "not-a-secret", "__redis_pidfile": str(tmp_path / "redis.pid"),
             "__redis_logfile": str(tmp_path / "redis.log")}
    run = playbook("-i", "localhost,", str(tmp_path / "play.yml"), "-e", json.dumps(extra))
    assert run.returncode == 0, run.stdout
    return tmp_path / "redis.conf"


@pytest.mark.parametrize(("version", "kept"), [
    ("7.0.15", {"CONFIG", "ACL", "FAILOVER", "SHUTDOWN", "FUNCTION"}),
    ("6.0.16", {"CONFIG", "ACL", "SHUTDOWN"}),  # Ubuntu 22.04: no FAILOVER before 6.2
    ("5.0.7", {"CONFIG", "SHUTDOWN"}),
    ("unknown", {"CONFIG", "ACL", "FAILOVER", "SHUTDOWN", "FUNCTION"}),
])
def test_redis_is_started_without_only_the_commands_its_release_has(tmp_path, version, kept):
    """rename-command of a command the server does not have stops Redis from starting: the
    role disables FUNCTION only from 7.0, FAILOVER from 6.2 and ACL from 6.0. Output it cannot
    read keeps all."""
    conf = _redis_conf(tmp_path, version).read_text()
    renamed = {line.split()[1] for line in conf.splitlines() if line.startswith("rename-command")}
    assert renamed & {"CONFIG", "ACL", "FAILOVER", "SHUTDOWN", "FUNCTION"} == kept, conf


def test_redis_starts_from_the_roles_configuration_without_config(tmp_path):
    """This machine's Redis started from what the role writes: it answers, refuses to a client
    that holds the password (every task can read it) the commands that reach past the queue
    (MIGRATE made Redis connect to any host and send what the task chose), and the runtime
    still does all it does: submit, claim, report, purge."""
    port = free_port()
    conf = _redis_conf(tmp_path, None, port)
    server = subprocess.Popen(["redis-server", str(conf)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        client = redis.Redis(port=port, password="not-a-secret")
        wait_for(lambda: server.poll() is not None or _pings(client), 30, "Redis to answer")
        assert server.poll() is None, server.communicate()[0]
        for command in (["CONFIG", "GET", "bind"], ["MIGRATE", "127.0.0.1", str(port), "", "0",
                                                    "1000", "KEYS", "k"],
                        ["FLUSHALL"], ["FLUSHDB"], ["SWAPDB", "0", "1"], ["BGSAVE"], ["SAVE"],
                        ["BGREWRITEAOF"], ["FUNCTION", "LIST"]):
            with pytest.raises(redis.ResponseError, match="unknown command"):
                client.execute_command(*command)
        q = Queue(Redis(f"redis://:not-a-secret@127.0.0.1:{port}/0"), "roles")
        q.submit([parse_line(b"shell:0:0:1:true")])
        assert q.register("w", "tok", 60_000, {"host": "h", "room_mb": 1024})[0]
        (claim,) = q.claim("w", "tok", 1024, 1, 1)
        assert q.finish(claim.task_id, "w", claim.attempt, {"exit_code": 0}) == 1
        assert q.counts()["finished"] == 1
        assert q.purge() > 0 and not client.keys("*")
    finally:
        server.kill()
        server.wait(10)


def _runtime_wheel(source: Path, out: Path) -> bytes:
    """The runtime wheel built as the distcomp role builds it (wheelhouse.yml)."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
                    "--wheel-dir", str(out), str(source)], check=True, capture_output=True,
                   env={**os.environ, "SOURCE_DATE_EPOCH": "315532800"}, timeout=300)
    (wheel,) = out.glob("distcomp-*.whl")
    return wheel.read_bytes()


def test_a_change_to_the_docs_leaves_the_runtime_wheel_as_it_was(tmp_path):
    """A new wheel reinstalls the runtime and restarts every worker, which kills and requeues
    the running tasks: a checkout that differs only in its docs (README.md was the wheel's long
    description) must build the same bytes."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, check=True,
                             capture_output=True, text=True).stdout.split("\0")
    for name in ("a", "b"):
        for rel in filter(None, tracked):
            (tmp_path / name / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, tmp_path / name / rel)
    for doc in ("README.md", "docs/design.md"):
        with open(tmp_path / "b" / doc, "a") as f:
            f.write("\nA line a teammate added.\n")
    assert _runtime_wheel(tmp_path / "a", tmp_path / "wa") == \
        _runtime_wheel(tmp_path / "b", tmp_path / "wb")


def _disk_run(tmp_path: Path, **settings: object) -> subprocess.CompletedProcess:
    """The common role's disk tasks on this machine, with the extra disk at ``tmp_path/mydata``
    (never mounted here), a stand-in mkextrafs.pl that logs its calls to ``tmp_path/calls``,
    and the file system table ``tmp_path/fstab``."""
    stub = tmp_path / "mkextrafs.pl"
    if not stub.exists():
        stub.write_text(f"#!/bin/sh\necho \"$*\" >> {tmp_path / 'calls'}\n")
        stub.chmod(0o755)
        (tmp_path / "fstab").touch()
    (tmp_path / "play.yml").write_text(
        "- hosts: localhost\n  connection: local\n  gather_facts: false\n  tasks:\n"
        "    - ansible.builtin.include_role:\n        name: common\n        tasks_from: disk\n")
    extra = {"common_extra_disk_mount": str(tmp_path / "mydata"), "common_mkextrafs_path": str(stub),
             "common_mkextrafs_marker": str(tmp_path / "made"), "__common_fstab": str(tmp_path / "fstab"),
             "common_user": "root", "common_group": "root",
             "common_scratch_fallback_dir": str(tmp_path / "scratch"), **settings}
    return playbook("-i", "localhost,", str(tmp_path / "play.yml"), "-e", json.dumps(extra))


def test_an_extra_disk_made_before_is_never_made_again(tmp_path):
    """mkextrafs.pl -f makes a new file system: run again on a disk that failed to mount at
    boot, it erased the MooseFS chunks and scratch data on it. The role makes the disk once;
    found unmounted after that, or listed in /etc/fstab, it stops the run and says what to do."""
    first = _disk_run(tmp_path)
    assert first.returncode == 0, first.stdout
    assert (tmp_path / "calls").read_text() == f"-f {tmp_path / 'mydata'}\n"
    again = _disk_run(tmp_path)
    assert again.returncode != 0
    assert f"{tmp_path / 'mydata'} is not mounted, but was made by mkextrafs.pl in an earlier " \
        f"run ({tmp_path / 'made'}): making it again would erase" in again.stdout, again.stdout
    assert "set common_extra_disk_enabled=false to go on without it" in again.stdout
    (tmp_path / "made").unlink()
    (tmp_path / "fstab").write_text(f"/dev/sdb4 {tmp_path / 'mydata'} ext4 defaults 0 0\n")
    listed = _disk_run(tmp_path)
    assert f"is not mounted, but is listed in {tmp_path / 'fstab'}" in listed.stdout, listed.stdout
    without = _disk_run(tmp_path, common_extra_disk_enabled=False)
    assert without.returncode == 0, without.stdout
    assert (tmp_path / "calls").read_text().count("\n") == 1, "mkextrafs.pl ran again"


@pytest.mark.parametrize(("release", "runs"), [
    (None, True),  # this machine's own: Debian 12
    (["Ubuntu", "24.04"], True),
    (["Debian", "13.1"], True),
    (["Ubuntu", "20.04"], False),
    (["Debian", "11.9"], False),
    (["Rocky", "9.4"], False),
    (["Debian", "n/a"], False),
])
def test_a_node_on_a_release_the_roles_are_not_built_for_stops_the_run_first(tmp_path, release,
                                                                             runs):
    """Ubuntu 20.04's Python 3.8 failed at the runtime's pip install, after Redis and MooseFS
    were set up: the common role's first step names the release and what to pick instead."""
    (tmp_path / "play.yml").write_text(
        "- hosts: localhost\n  connection: local\n  tasks:\n"
        "    - ansible.builtin.include_role:\n        name: common\n        tasks_from: preflight\n")
    extra = ["-e", json.dumps({"__common_release": release})] if release else []
    proc = playbook("-i", "localhost,", str(tmp_path / "play.yml"), *extra)
    assert (proc.returncode == 0) == runs, proc.stdout
    if not runs:
        assert f"localhost runs {' '.join(release)}; distcomp needs Debian 12 or Ubuntu 22.04, " \
            "or a later release of either" in proc.stdout, proc.stdout


def _tasks(entries: list) -> list[dict]:
    """Every task of a task file, those inside blocks included."""
    found = []
    for entry in entries or []:
        found.append(entry)
        for section in ("block", "rescue", "always"):
            found.extend(_tasks(entry.get(section)))
    return found


def test_every_apt_task_waits_out_a_fresh_nodes_own_upgrades():
    """The apt module gives up on the package lock after 60 s, and a freshly booted node's
    unattended-upgrades or apt-daily run can hold it longer: site.yml would stop on a node that
    only needed to wait."""
    import yaml

    apt_tasks = []
    for path in sorted((REPO / "roles").glob("*/tasks/*.yml")):
        for task in _tasks(yaml.safe_load(path.read_text())):
            if "ansible.builtin.apt" in task:
                apt_tasks.append((path.relative_to(REPO), task["name"],
                                  task["ansible.builtin.apt"].get("lock_timeout", 60)))
    assert len(apt_tasks) >= 8
    short = [task for task in apt_tasks if task[2] < 600]
    assert not short, short


def _user_directories() -> list[tuple[str, dict]]:
    """The role tasks that make a directory the distcomp user owns, as (name, module args)."""
    import yaml

    found = []
    for path in sorted((REPO / "roles").glob("*/tasks/*.yml")):
        for task in _tasks(yaml.safe_load(path.read_text())):
            args = task.get("ansible.builtin.file") or {}
            owners = [args.get("owner", "")] + [i.get("owner", "") for i in task.get("loop", [])
                                               if isinstance(i, dict)]
            if args.get("state") == "directory" and \
                    {"{{ distcomp_user }}", "{{ common_user }}"} & set(owners):
                found.append((f"{path.relative_to(REPO)}: {task['name']}", args))
    return found


def test_a_directory_a_task_replaced_with_a_symlink_is_not_handed_over():
    """Tasks run as the distcomp user, who can rename a directory of theirs (the results, the
    scratch, the spool, all in directories the user owns) and leave a symlink to /root there:
    the file module follows links by default, and the next site.yml run as root gave the
    link's target to the distcomp user, a way to root on every node."""
    tasks = _user_directories()
    assert len(tasks) >= 5, tasks
    following = [name for name, args in tasks if args.get("follow", True) is not False]
    assert not following, following


def test_the_roles_directory_step_refuses_a_symlink_and_leaves_its_target(tmp_path):
    """The results directory's step as the role has it, run as root against a symlink a task
    put in the directory's place: the run fails and the link's target keeps its owner."""
    name, args = next(t for t in _user_directories() if "results directory" in t[0])
    target = tmp_path / "root-only"
    target.mkdir(mode=0o700)
    (tmp_path / "results").symlink_to(target)
    task = {**args, "path": str(tmp_path / "results"), "owner": "nobody", "group": "nogroup"}
    (tmp_path / "play.yml").write_text(json.dumps([{
        "hosts": "localhost", "connection": "local", "gather_facts": False,
        "tasks": [{"name": name, "ansible.builtin.file": task}]}]))
    proc = playbook("-i", "localhost,", str(tmp_path / "play.yml"))
    assert proc.returncode != 0, proc.stdout
    st = target.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (os.getuid(), os.getgid(), 0o700)
