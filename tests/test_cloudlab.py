"""CloudLab manifest -> Ansible inventory: parsing, choices, error messages, and the inventory
script as Ansible runs it.

The fixtures in tests/fixtures/cloudlab/ follow what the portal writes: RSpec v3 with the emulab,
jacks and site-info extensions, one `<login>` per project member, links listed per site.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from distcomp import cloudlab

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "cloudlab"
SCRIPT = REPO / "inventory" / "cloudlab" / "cloudlab.py"


def fixture(name: str) -> Path:
    return FIXTURES / name


def inventory_of(name: str, **choices) -> cloudlab.Inventory:
    return cloudlab.inventory_from_file(fixture(name), **choices)


def error_of(name: str, **choices) -> str:
    with pytest.raises(cloudlab.ManifestError) as caught:
        inventory_of(name, **choices)
    return str(caught.value)


# --- parsing -----------------------------------------------------------------------------------

def test_parse_reads_nodes_logins_lans_and_hardware():
    manifest = cloudlab.load_manifest(fixture("single-site.xml"))
    assert [n.name for n in manifest.nodes] == ["node0", "node1", "node2", "node3"]
    assert manifest.lans == ("link-0",)
    node0 = manifest.nodes[0]
    assert [login.username for login in node0.logins] == ["alice", "bob", "carol"]
    assert node0.logins[0] == cloudlab.Login("alice", "ms1041.utah.cloudlab.us", 22)
    assert node0.lan_addresses["link-0"] == cloudlab.LanAddress("10.10.1.1", "10.10.1.0/24")
    assert node0.hardware_type == "m510"


def test_parse_merges_a_link_listed_once_per_site():
    manifest = cloudlab.load_manifest(fixture("multi-site.xml"))
    assert manifest.lans == ("lan-data", "lan-ctl")
    assert {n.name: n.lan_addresses["lan-data"].address for n in manifest.nodes} == {
        "node0": "10.10.1.1", "node1": "10.10.1.2", "node2": "10.10.1.3", "node3": "10.10.1.4",
    }


def test_hardware_type_falls_back_to_the_emulab_vnode():
    """A Xen VM's manifest has no <hardware_type>; its host's type is on <emulab:vnode>."""
    node3 = cloudlab.load_manifest(fixture("multi-site.xml")).nodes[3]
    assert node3.hardware_type == "c220g5"


def test_parse_accepts_leading_whitespace_as_pasted_from_the_portal():
    data = b"\n  " + fixture("single-site.xml").read_bytes()
    assert len(cloudlab.parse_manifest(data).nodes) == 4


# --- choices -----------------------------------------------------------------------------------

def test_default_inventory_single_site():
    inventory = inventory_of("single-site.xml")
    assert inventory.groups == {"manager": ["node0"], "workers": ["node1", "node2", "node3"]}
    assert inventory.all_vars == {"distcomp_manager_address": "10.10.1.1"}
    assert inventory.hostvars["node0"] == {
        "ansible_host": "ms1041.utah.cloudlab.us",
        "ansible_port": 22,
        "ansible_user": "alice",
        "distcomp_node_address": "10.10.1.1",
        "distcomp_experiment_network": "10.10.1.0/24",
        "cloudlab_hardware_type": "m510",
    }
    assert inventory.hostvars["node3"]["distcomp_node_address"] == "10.10.1.4"
    assert inventory.lan == "link-0"
    assert inventory.skipped == ()


def test_manager_option_moves_node0_to_the_workers():
    inventory = inventory_of("single-site.xml", manager="node2")
    assert inventory.groups == {"manager": ["node2"], "workers": ["node0", "node1", "node3"]}
    assert inventory.all_vars["distcomp_manager_address"] == "10.10.1.3"


def test_user_option_picks_that_login_everywhere():
    inventory = inventory_of("single-site.xml", user="carol")
    assert {v["ansible_user"] for v in inventory.hostvars.values()} == {"carol"}


def test_lan_option_on_a_multi_site_experiment():
    inventory = inventory_of("multi-site.xml", lan="lan-data")
    assert inventory.groups["workers"] == ["node1", "node2", "node3"]
    assert inventory.hostvars["node2"]["ansible_host"] == "c220g5-110417.wisc.cloudlab.us"
    assert inventory.hostvars["node2"]["cloudlab_hardware_type"] == "c220g5"
    assert inventory.hostvars["node3"]["ansible_port"] == 26011
    assert inventory.hostvars["node0"]["cloudlab_hardware_type"] == "m510"


def test_other_lan_gives_other_addresses_and_network():
    inventory = inventory_of("multi-site.xml", lan="lan-ctl", skip_off_lan=True)
    assert inventory.groups == {"manager": ["node0"], "workers": ["node1"]}
    assert inventory.skipped == ("node2", "node3")
    assert inventory.hostvars["node1"]["distcomp_node_address"] == "10.10.2.2"
    assert inventory.hostvars["node1"]["distcomp_experiment_network"] == "10.10.2.0/24"


def test_skip_off_lan_leaves_out_the_node_without_an_address():
    inventory = inventory_of("node-off-lan.xml", skip_off_lan=True)
    assert inventory.groups == {"manager": ["node0"], "workers": ["node1"]}
    assert inventory.skipped == ("node2",)


def test_local_cluster_fixture_names_the_container_nodes():
    inventory = inventory_of("local-cluster.xml")
    assert inventory.groups == {"manager": ["node0"], "workers": ["node1", "node2"]}
    assert [v["ansible_host"] for v in inventory.hostvars.values()] == ["node0", "node1", "node2"]
    assert {v["ansible_user"] for v in inventory.hostvars.values()} == {"root"}


# --- error messages ----------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("name", "choices", "message"),
    [
        ("multi-site.xml", {},
         "several LANs (lan-data, lan-ctl); choose one with --lan"),
        ("multi-site.xml", {"lan": "lan-storage"},
         "no LAN named lan-storage (LANs: lan-data, lan-ctl); choose one with --lan"),
        ("multi-site.xml", {"lan": "lan-ctl"},
         "node node2 has no address on LAN lan-ctl; use --skip-off-lan to leave it out"),
        ("multi-site.xml", {"lan": "lan-data", "user": "dave"},
         "no login for user dave on node node3 (users: alice); choose one with --user"),
        ("single-site.xml", {"user": "zed"},
         ("no login for user zed on node node0 (users: alice, bob, carol); "
         "choose one with --user")),
        ("single-site.xml", {"manager": "head"},
         "no node named head (nodes: node0, node1, node2, node3); choose one with --manager"),
        ("node-off-lan.xml", {},
         "node node2 has no address on LAN link-0; use --skip-off-lan to leave it out"),
        ("node-off-lan.xml", {"manager": "node2", "skip_off_lan": True},
         "manager node node2 has no address on LAN link-0"),
        ("missing-login.xml", {},
         ("node node1 has no login (<services><login>); save the manifest again once the "
         "experiment is ready")),
        ("request.xml", {},
         ("this is a request RSpec, not a manifest (no node has a sliver_id or a login); "
         "save the experiment's Manifest tab once it is ready")),
        ("single-node.xml", {},
         ("no LAN with IPv4 addresses; distcomp needs its nodes on one experiment LAN "
         "(see cloudlab/profile.py)")),
    ],
)
def test_error_messages(name, choices, message):
    assert error_of(name, **choices) == message


def test_error_messages_can_name_environment_variables():
    options = {"manager": "DISTCOMP_MANAGER", "lan": "DISTCOMP_LAN", "user": "DISTCOMP_USER",
               "skip_off_lan": "DISTCOMP_SKIP_OFF_LAN=1"}
    assert error_of("multi-site.xml", options=options).endswith("choose one with DISTCOMP_LAN")


RSPEC_OPEN = '<rspec xmlns="http://www.geni.net/resources/rspec/3" type="manifest">'


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not an XML document (no element found: line 1, column 0)"),
        (b"hosts:\n  node0: {}\n", "not an XML document (syntax error: line 1, column 0)"),
        (b"<rspec><node></rspec>",
         "not an XML document (mismatched tag: line 1, column 15)"),
        (b'<rspec xmlns="http://www.protogeni.net/resources/rspec/2" type="manifest"/>',
         ("not an RSpec v3 manifest (root element is "
         "{http://www.protogeni.net/resources/rspec/2}rspec, expected "
         "{http://www.geni.net/resources/rspec/3}rspec)")),
        (b"<project><name>x</name></project>",
         ("not an RSpec v3 manifest (root element is project, expected "
         "{http://www.geni.net/resources/rspec/3}rspec)")),
        (RSPEC_OPEN.encode() + b"</rspec>", "the manifest lists no nodes"),
        (RSPEC_OPEN.encode() + b'<node sliver_id="s1"/></rspec>',
         "a <node> has no client_id attribute"),
        ((RSPEC_OPEN + '<node client_id="node0" sliver_id="s1"><services>'
          '<login hostname="pc1.emulab.net" port="ssh" username="alice"/>'
          "</services></node></rspec>").encode(),
         "node node0 has a <login> with port 'ssh' (expected 1-65535)"),
        ((RSPEC_OPEN + '<node client_id="node0" sliver_id="s1"><services>'
          '<login port="22" username="alice"/></services></node></rspec>').encode(),
         "node node0 has a <login> without username or hostname"),
        ((RSPEC_OPEN + '<node client_id="node0" sliver_id="s1">'
          '<interface client_id="node0:eth1"><ip address="10.10.1.300" netmask="255.255.255.0"/>'
          "</interface></node></rspec>").encode(),
         "node node0 has an invalid IPv4 address '10.10.1.300'/'255.255.255.0'"),
    ],
)
def test_bad_documents(content, message):
    with pytest.raises(cloudlab.ManifestError) as caught:
        cloudlab.parse_manifest(content)
    assert str(caught.value) == message


@pytest.mark.parametrize("port", ["-5", "0", "99999", "٢٢", "9" * 5000])
def test_a_login_port_outside_1_to_65535_is_refused(port):
    content = (RSPEC_OPEN + '<node client_id="node0" sliver_id="s1"><services>'
               f'<login hostname="pc1.emulab.net" port="{port}" username="alice"/>'
               "</services></node></rspec>").encode()
    with pytest.raises(cloudlab.ManifestError) as caught:
        cloudlab.parse_manifest(content)
    assert str(caught.value) == f"node node0 has a <login> with port {port!r} (expected 1-65535)"


@pytest.mark.parametrize(("encoding", "reason"), [
    ("bogus", "unknown encoding: bogus"),
    ("utf-32", "multi-byte encodings are not supported"),
    ("shift_jis", "multi-byte encodings are not supported"),
])
def test_an_encoding_expat_cannot_read_is_a_manifest_error(encoding, reason):
    content = f'<?xml version="1.0" encoding="{encoding}"?>{RSPEC_OPEN}</rspec>'.encode()
    with pytest.raises(cloudlab.ManifestError) as caught:
        cloudlab.parse_manifest(content)
    assert str(caught.value) == (f"cannot read the encoding its XML declaration names ({reason}); "
                                 "save the manifest as UTF-8")


def test_unreadable_file(tmp_path):
    with pytest.raises(cloudlab.ManifestError) as caught:
        cloudlab.load_manifest(tmp_path / "manifest.xml")
    assert str(caught.value) == "cannot read the file (No such file or directory)"


# --- YAML output -------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("ms1041.utah.cloudlab.us", "ms1041.utah.cloudlab.us"),
        ("node0", "node0"),
        ("10.10.1.1", '"10.10.1.1"'),
        ("10.10.1.0/24", '"10.10.1.0/24"'),
        ("yes", '"yes"'),
        ("Off", '"Off"'),
        ("null", '"null"'),
        ("a b", '"a b"'),
        ("x: y", '"x: y"'),
        (22, "22"),
        (True, "true"),
    ],
)
def test_yaml_scalars(value, text):
    assert cloudlab._yaml_scalar(value) == text


def test_yaml_round_trips_to_the_same_inventory():
    yaml = pytest.importorskip("yaml")
    inventory = inventory_of("multi-site.xml", lan="lan-data")
    loaded = yaml.safe_load(cloudlab.to_yaml(inventory, "multi-site.xml"))
    children = loaded["all"]["children"]
    assert loaded["all"]["vars"] == inventory.all_vars
    assert list(children) == ["manager", "workers"]
    for group, hosts in inventory.groups.items():
        assert children[group]["hosts"] == {h: inventory.hostvars[h] for h in hosts}


def test_yaml_writes_an_empty_worker_group_as_a_mapping():
    inventory = inventory_of("multi-site.xml", lan="lan-ctl", skip_off_lan=True, manager="node1")
    inventory.groups["workers"].clear()
    assert "    workers:\n      hosts: {}\n" in cloudlab.to_yaml(inventory, "m.xml")


# --- CLI wiring --------------------------------------------------------------------------------

def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="distcomp")
    cloudlab.add_inventory_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_writes_yaml_to_stdout(capsys):
    assert run_cli(["inventory", "cloudlab", str(fixture("single-site.xml"))]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith("# Generated by `distcomp inventory cloudlab` from single-site.xml.\n")
    assert "  vars:\n    distcomp_manager_address: \"10.10.1.1\"\n" in out
    assert "        node1:\n          ansible_host: ms1325.utah.cloudlab.us\n" in out


def test_cli_writes_the_output_file(tmp_path, capsys):
    target = tmp_path / "hosts.yml"
    argv = ["inventory", "cloudlab", str(fixture("multi-site.xml")), "--lan", "lan-data",
            "--user", "alice", "--manager", "node1", "-o", str(target)]
    assert run_cli(argv) == 0
    assert capsys.readouterr() == ("", "")
    text = target.read_text()
    assert "    manager:\n      hosts:\n        node1:\n" in text
    assert "          ansible_port: 26011\n" in text


def test_cli_warns_about_left_out_nodes(capsys):
    argv = ["inventory", "cloudlab", str(fixture("node-off-lan.xml")), "--skip-off-lan"]
    assert run_cli(argv) == 0
    err = capsys.readouterr().err
    assert err == (f"distcomp: warning: {fixture('node-off-lan.xml')}: left out node node2 "
                   "(no address on LAN link-0)\n")


@pytest.mark.parametrize("option", ["--manager", "--lan", "--user"])
def test_cli_an_option_given_empty_is_refused_not_taken_for_the_default(option, capsys):
    """`--user "$ME"` with ME unset wrote an inventory logging in as the manifest's first
    user, another project member."""
    assert run_cli(["inventory", "cloudlab", str(fixture("single-site.xml")), option, ""]) == 2
    err = f"distcomp: error: {option} is empty: give a value, or leave the option out for the " \
        "default\n"
    assert capsys.readouterr() == ("", err)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing.xml"], "missing.xml: cannot read the file (No such file or directory)"),
        ([str(fixture("multi-site.xml"))],
         f"{fixture('multi-site.xml')}: several LANs (lan-data, lan-ctl); choose one with --lan"),
        ([str(fixture("single-site.xml")), "--user", "zed"],
         (f"{fixture('single-site.xml')}: no login for user zed on node node0 "
         "(users: alice, bob, carol); choose one with --user")),
        ([str(fixture("request.xml"))],
         (f"{fixture('request.xml')}: this is a request RSpec, not a manifest "
         "(no node has a sliver_id or a login); save the experiment's Manifest tab once it is "
         "ready")),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(argv, message, capsys):
    assert run_cli(["inventory", "cloudlab", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"distcomp: error: {message}\n"


def test_cli_output_dash_and_a_failed_write_are_as_for_export(tmp_path, capsys, monkeypatch):
    """`-o -` made a file named '-', and a write that failed (a full disk) exited 2 as bad
    usage; `export -o` writes to stdout and exits 1."""
    monkeypatch.chdir(tmp_path)
    argv = ["inventory", "cloudlab", str(fixture("single-site.xml")), "-o"]
    assert run_cli([*argv, "-"]) == 0
    assert capsys.readouterr().out.startswith("# Generated by `distcomp inventory cloudlab`")
    assert not (tmp_path / "-").exists()
    assert run_cli([*argv, "/dev/full"]) == 1
    assert "(the inventory was not written)" in capsys.readouterr().err


def test_cli_unwritable_output(tmp_path, capsys):
    target = tmp_path / "no-such-dir" / "hosts.yml"
    argv = ["inventory", "cloudlab", str(fixture("single-site.xml")), "-o", str(target)]
    assert run_cli(argv) == 2
    assert capsys.readouterr().err == (
        f"distcomp: error: {target}: cannot write there: No such file or directory (the "
        f"inventory was not written)\n"
    )


# --- the inventory script, run as Ansible runs it ----------------------------------------------

@pytest.fixture
def script_tree(tmp_path):
    """A copy of the script and the parser in the repository's layout.

    The real inventory/cloudlab/ may hold a user's manifest.xml or hosts.yml; tests must neither
    read nor overwrite those.
    """
    (tmp_path / "inventory" / "cloudlab").mkdir(parents=True)
    (tmp_path / "distcomp").mkdir()
    shutil.copy2(SCRIPT, tmp_path / "inventory" / "cloudlab" / "cloudlab.py")
    shutil.copy2(REPO / "distcomp" / "cloudlab.py", tmp_path / "distcomp" / "cloudlab.py")
    return tmp_path / "inventory" / "cloudlab"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTCOMP_")}
    env.update(extra)
    return env


def run_script(directory: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(directory / "cloudlab.py"), *args], capture_output=True,
                          text=True, env=clean_env(**env), check=False)


def test_script_list_from_the_default_manifest(script_tree):
    shutil.copy(fixture("single-site.xml"), script_tree / "manifest.xml")
    result = run_script(script_tree, "--list")
    assert (result.returncode, result.stderr) == (0, "")
    data = json.loads(result.stdout)
    expected = cloudlab.inventory_from_file(fixture("single-site.xml"))
    assert data == {
        "_meta": {"hostvars": expected.hostvars},
        "all": {"children": ["manager", "workers"],
                "vars": {"distcomp_manager_address": "10.10.1.1"}},
        "manager": {"hosts": ["node0"]},
        "workers": {"hosts": ["node1", "node2", "node3"]},
    }


def test_script_options_from_the_environment(script_tree):
    result = run_script(script_tree, "--list", DISTCOMP_MANIFEST=str(fixture("multi-site.xml")),
                        DISTCOMP_LAN="lan-data", DISTCOMP_USER="alice", DISTCOMP_MANAGER="node2")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["manager"] == {"hosts": ["node2"]}
    assert data["workers"] == {"hosts": ["node0", "node1", "node3"]}
    assert data["all"]["vars"] == {"distcomp_manager_address": "10.10.1.3"}


def test_script_skip_off_lan_from_the_environment(script_tree):
    result = run_script(script_tree, "--list", DISTCOMP_MANIFEST=str(fixture("node-off-lan.xml")),
                        DISTCOMP_SKIP_OFF_LAN="1")
    assert result.returncode == 0
    assert json.loads(result.stdout)["workers"] == {"hosts": ["node1"]}
    assert result.stderr == (f"distcomp: warning: {fixture('node-off-lan.xml')}: left out node "
                             "node2 (no address on LAN link-0)\n")


def test_script_host(script_tree):
    manifest = str(fixture("multi-site.xml"))
    result = run_script(script_tree, "--host", "node3", DISTCOMP_MANIFEST=manifest,
                        DISTCOMP_LAN="lan-data")
    assert result.returncode == 0
    assert json.loads(result.stdout) == {
        "ansible_host": "c220g5-110418.wisc.cloudlab.us",
        "ansible_port": 26011,
        "ansible_user": "alice",
        "distcomp_node_address": "10.10.1.4",
        "distcomp_experiment_network": "10.10.1.0/24",
        "cloudlab_hardware_type": "c220g5",
    }
    unknown = run_script(script_tree, "--host", "node9", DISTCOMP_MANIFEST=manifest,
                         DISTCOMP_LAN="lan-data")
    assert (unknown.returncode, json.loads(unknown.stdout)) == (0, {})


def test_script_error_names_the_environment_variable(script_tree):
    manifest = str(fixture("multi-site.xml"))
    result = run_script(script_tree, "--list", DISTCOMP_MANIFEST=manifest)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == (f"distcomp: error: {manifest}: several LANs (lan-data, lan-ctl); "
                             "choose one with DISTCOMP_LAN\n")


def test_script_missing_explicit_manifest_is_an_error(script_tree):
    missing = str(script_tree / "elsewhere.xml")
    result = run_script(script_tree, "--list", DISTCOMP_MANIFEST=missing)
    assert result.returncode == 2
    assert result.stderr == (f"distcomp: error: {missing}: cannot read the file "
                             "(No such file or directory)\n")


def test_script_without_manifest_answers_an_empty_inventory_and_a_hint(script_tree):
    result = run_script(script_tree, "--list")
    assert (result.returncode, json.loads(result.stdout)) == (0, {"_meta": {"hostvars": {}}})
    assert result.stderr.count("\n") == 1
    assert "manifest.xml" in result.stderr and "hosts.yml.example" in result.stderr


def test_script_without_manifest_is_quiet_when_hosts_yml_describes_the_cluster(script_tree):
    (script_tree / "hosts.yml").write_text("all: {}\n")
    result = run_script(script_tree, "--list")
    assert (result.returncode, result.stderr) == (0, "")
    assert json.loads(result.stdout) == {"_meta": {"hostvars": {}}}


def test_script_usage(script_tree):
    result = run_script(script_tree, "--bogus")
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "usage: cloudlab.py --list | --host NAME\n"


def test_script_is_executable_in_the_repository():
    assert os.access(SCRIPT, os.X_OK)
    assert SCRIPT.read_text().startswith("#!/usr/bin/env python3\n")


@pytest.mark.skipif(shutil.which("ansible-inventory") is None,
                    reason="ansible-inventory not installed")
def test_ansible_inventory_reads_the_directory(script_tree):
    """Ansible itself, on the layout users have: manifest.xml next to the script.

    The repository's ansible.cfg must keep Ansible's ini plugin away from manifest.xml, which it
    would otherwise read as a list of junk host names.
    """
    shutil.copy(fixture("multi-site.xml"), script_tree / "manifest.xml")
    env = clean_env(DISTCOMP_LAN="lan-data", ANSIBLE_CONFIG=str(REPO / "ansible.cfg"))
    result = subprocess.run(
        ["ansible-inventory", "-i", str(script_tree), "--list"],
        capture_output=True, text=True, env=env, check=False,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["manager"]["hosts"] == ["node0"]
    assert data["workers"]["hosts"] == ["node1", "node2", "node3"]
    assert sorted(data["_meta"]["hostvars"]) == ["node0", "node1", "node2", "node3"]
    assert data["_meta"]["hostvars"]["node3"]["ansible_port"] == 26011
    assert data["_meta"]["hostvars"]["node2"]["distcomp_node_address"] == "10.10.1.3"


def _cli_wires_inventory() -> bool:
    cli = REPO / "distcomp" / "cli.py"
    return cli.exists() and "add_inventory_command" in cli.read_text()


@pytest.mark.skipif(not _cli_wires_inventory(),
                    reason="distcomp/cli.py does not call add_inventory_command yet")
def test_python_m_distcomp_inventory_cloudlab(tmp_path):
    for dependency in ("psutil",):
        pytest.importorskip(dependency, reason="the distcomp CLI needs the runtime dependencies")
    target = tmp_path / "hosts.yml"
    env = clean_env(PYTHONPATH=str(REPO))
    ok = subprocess.run(
        [sys.executable, "-m", "distcomp", "inventory", "cloudlab",
         str(fixture("local-cluster.xml")), "-o", str(target)],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=False,
    )
    assert (ok.returncode, ok.stderr) == (0, "")
    assert "    manager:\n      hosts:\n        node0:\n" in target.read_text()

    bad = subprocess.run(
        [sys.executable, "-m", "distcomp", "inventory", "cloudlab",
         str(fixture("multi-site.xml"))],
        capture_output=True, text=True, env=env, cwd=tmp_path, check=False,
    )
    assert bad.returncode == 2
    assert bad.stderr == (f"distcomp: error: {fixture('multi-site.xml')}: several LANs "
                          "(lan-data, lan-ctl); choose one with --lan\n")


def test_an_inventory_that_cannot_be_written_whole_leaves_the_old_one(tmp_path):
    """A full disk cut the new inventory where the old one was; a cut on a line boundary would
    have Ansible see fewer workers without a word."""
    target = tmp_path / "hosts.yml"
    target.write_text("the previous inventory\n")
    proc = subprocess.run(
        [sys.executable, "-m", "distcomp", "inventory", "cloudlab",
         str(fixture("single-site.xml")), "-o", str(target)],
        capture_output=True, text=True, timeout=60, check=False,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (512, 512)))
    assert proc.returncode == 1 and proc.stderr == (
        f"distcomp: error: {target}: cannot write: File too large; the file was left as it "
        f"was (the inventory was not written)\n")
    assert target.read_text() == "the previous inventory\n"
    assert [p.name for p in tmp_path.iterdir()] == ["hosts.yml"]


# --- what a copy of the manifest may look like -----------------------------------------------

def test_a_manifest_of_one_site_says_which_nodes_it_does_not_list(script_tree, capsys):
    """`geni-get manifest` on a node of a multi-site experiment answers with its own site's
    nodes: the inventory had half the workers, and nothing said so."""
    name = fixture("one-site-of-two.xml")
    warning = (f"distcomp: warning: {name}: LAN lan-data also links node2:if0, node3:if0, of "
               "nodes this manifest does not list: it holds one site's nodes of a multi-site "
               "experiment; save the portal's Manifest tab, which lists them all\n")
    assert run_cli(["inventory", "cloudlab", str(name), "--lan", "lan-data"]) == 0
    assert capsys.readouterr().err == warning
    result = run_script(script_tree, "--list", DISTCOMP_MANIFEST=str(name),
                        DISTCOMP_LAN="lan-data")
    assert result.returncode == 0 and result.stderr == warning
    assert json.loads(result.stdout)["workers"] == {"hosts": ["node1"]}
    assert cloudlab.inventory_from_file(fixture("multi-site.xml"), lan="lan-data").absent == ()


@pytest.mark.parametrize("encode", [
    # a UTF-8 byte-order mark, then the blank line a paste from the portal starts with
    lambda text: b"\xef\xbb\xbf\r\n" + text.encode(),
    # Windows PowerShell 5.1's `ssh ... geni-get manifest > manifest.xml`: UTF-16 with its mark,
    # the declaration still saying UTF-8
    lambda text: text.replace("\n", "\r\n").encode("utf-16"),
    lambda text: text.encode("utf-32"),
], ids=["utf-8-bom-and-blank-line", "utf-16-saying-utf-8", "utf-32"])
def test_a_copy_saved_by_a_windows_editor_or_shell_reads_as_the_manifest(encode):
    text = fixture("single-site.xml").read_text()
    assert text.startswith('<?xml version="1.0" encoding="UTF-8"?>')
    assert cloudlab.build_inventory(cloudlab.parse_manifest(encode(text))) == \
        cloudlab.inventory_from_file(fixture("single-site.xml"))


def test_a_copy_that_starts_as_utf_16_but_is_not_is_named_so():
    with pytest.raises(cloudlab.ManifestError) as caught:
        cloudlab.parse_manifest(b"\xff\xfe<\x00r\x00\x00\xd8")
    assert str(caught.value) == "starts as UTF-16 text but is not; save the manifest as UTF-8"


def test_cli_a_manifest_name_with_a_line_break_leaves_the_yaml_and_the_errors_whole(
        tmp_path, capsys):
    import yaml

    odd = tmp_path / "my\nmanifest.xml"
    shutil.copy(fixture("single-site.xml"), odd)
    assert run_cli(["inventory", "cloudlab", str(odd), "-o", str(tmp_path / "hosts.yml")]) == 0
    text = (tmp_path / "hosts.yml").read_text()
    assert text.startswith("# Generated by `distcomp inventory cloudlab` from my\\nmanifest.xml.")
    assert yaml.safe_load(text)["all"]["children"]["manager"] == {"hosts": {"node0": {
        **cloudlab.inventory_from_file(odd).hostvars["node0"]}}}
    capsys.readouterr()
    assert run_cli(["inventory", "cloudlab", str(odd), "--manager", "nodeX"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "my\\nmanifest.xml: no node named nodeX" in err, err
