"""cloudlab/profile.py run for real under geni-lib: the request RSpec it prints for the
parameters a user picks, and geni-lib's parameter errors for the ones it refuses.

The portal runs a profile with GENILIB_PORTAL_MODE set and the chosen values in a JSON file named
by GENILIB_PORTAL_PARAMS_PATH (geni/portal.py, Context._bindParametersEnv); most tests do the
same. Outside the portal geni-lib reads them from the command line (`--nodeCount 3`), which one
test checks. Without GENILIB_PORTAL_REQUEST_PATH the request goes to stdout in both modes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Runs cloudlab/profile.py under geni-lib from PyPI (its docstring says what it bridges).
PREVIEW = REPO / "cloudlab" / "preview.py"
REQUEST_FIXTURE = REPO / "tests" / "fixtures" / "cloudlab" / "request.xml"

RSPEC = "{http://www.geni.net/resources/rspec/3}"
EMULAB = "{http://www.protogeni.net/resources/rspec/ext/emulab/1}"
TOUR = "{http://www.protogeni.net/resources/rspec/ext/apt-tour/1}"
UBUNTU22 = "urn:publicid:IDN+emulab.net+image+emulab-ops//UBUNTU22-64-STD"
UBUNTU24 = "urn:publicid:IDN+emulab.net+image+emulab-ops//UBUNTU24-64-STD"


@pytest.fixture
def profile(tmp_path):
    """Run the profile as the portal does: `profile(nodeCount=3)`; `profile(argv=[...])` runs it
    standalone with command-line parameters instead."""

    def run(argv: list[str] | None = None, **params) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GENILIB_")}
        if argv is None:
            params_file = tmp_path / "params.json"
            params_file.write_text(json.dumps(params))
            env["GENILIB_PORTAL_MODE"] = "1"
            env["GENILIB_PORTAL_PARAMS_PATH"] = str(params_file)
        return subprocess.run(
            [sys.executable, str(PREVIEW), *(argv or [])],
            check=False, env=env, capture_output=True, timeout=60,
        )

    return run


def request_of(result: subprocess.CompletedProcess) -> ET.Element:
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b""
    root = ET.fromstring(result.stdout)
    assert root.tag == f"{RSPEC}rspec"
    assert root.get("type") == "request"
    return root


def nodes_of(root: ET.Element) -> list[ET.Element]:
    return root.findall(f"{RSPEC}node")


def only_lan(root: ET.Element) -> ET.Element:
    links = root.findall(f"{RSPEC}link")
    assert len(links) == 1, [link.get("client_id") for link in links]
    assert links[0].find(f"{RSPEC}link_type").get("name") == "lan"
    return links[0]


def errors_of(result: subprocess.CompletedProcess) -> list[tuple[str, list[str]]]:
    """geni-lib's answer to refused parameters: no request, a JSON list of ParameterErrors on
    stderr, exit status 100 + their number (Context.verifyParameters)."""
    assert result.stdout == b""
    errors = json.loads(result.stderr)
    assert {e["errorType"] for e in errors} == {"ParameterError"}
    assert result.returncode == 100 + len(errors)
    return [(e["message"], e["params"]) for e in errors]


# --- requests -----------------------------------------------------------------------------------

def test_defaults_give_four_nodes_on_one_best_effort_lan_with_mydata(profile):
    root = request_of(profile())

    nodes = nodes_of(root)
    assert [n.get("client_id") for n in nodes] == ["node0", "node1", "node2", "node3"]
    for i, node in enumerate(nodes):
        assert node.get("exclusive") == "true"
        sliver = node.find(f"{RSPEC}sliver_type")
        assert sliver.get("name") == "raw"
        assert sliver.find(f"{RSPEC}disk_image").get("name") == UBUNTU22
        assert node.find(f"{RSPEC}hardware_type") is None
        [interface] = node.findall(f"{RSPEC}interface")
        assert interface.get("client_id") == f"node{i}:eth1"
        [ip] = interface.findall(f"{RSPEC}ip")
        assert ip.attrib == {"address": f"10.10.1.{i + 1}", "netmask": "255.255.255.0",
                             "type": "ipv4"}
        [blockstore] = node.findall(f"{EMULAB}blockstore")
        # No size: the testbed gives the blockstore all the free space (dataSize 0).
        assert blockstore.attrib == {"name": f"node{i}-bs", "mountpoint": "/mydata",
                                     "class": "local", "placement": "any"}

    lan = only_lan(root)
    assert [ref.get("client_id") for ref in lan.findall(f"{RSPEC}interface_ref")] == [
        f"node{i}:eth1" for i in range(4)
    ]
    assert lan.find(f"{EMULAB}best_effort").get("enabled") == "true"
    assert lan.findall(f"{RSPEC}property") == []
    assert lan.find(f"{EMULAB}interswitch") is None


def test_chosen_hardware_image_size_and_reserved_speed_reach_every_node(profile):
    root = request_of(profile(
        nodeCount=3, hardwareType="c6525-25g", osImage=UBUNTU24, dataSize=200,
        bestEffort=False, linkSpeed=25000000, sameSwitch=True,
    ))

    nodes = nodes_of(root)
    assert [n.get("client_id") for n in nodes] == ["node0", "node1", "node2"]
    for node in nodes:
        assert node.find(f"{RSPEC}hardware_type").get("name") == "c6525-25g"
        assert node.find(f"{RSPEC}sliver_type/{RSPEC}disk_image").get("name") == UBUNTU24
        [blockstore] = node.findall(f"{EMULAB}blockstore")
        assert blockstore.get("mountpoint") == "/mydata"
        assert blockstore.get("size") == "200GB"

    lan = only_lan(root)
    assert lan.find(f"{EMULAB}best_effort") is None
    # geni-lib's Link.bandwidth is in Kbps: 25000000 is 25 Gb/s, asked for on every interface.
    assert sorted((p.get("source_id"), p.get("dest_id"), p.get("capacity"))
                  for p in lan.findall(f"{RSPEC}property")) == [
        (f"node{i}:eth1", "lan", "25000000") for i in range(3)
    ]
    assert lan.find(f"{EMULAB}interswitch").get("allow") == "false"


def test_best_effort_off_without_a_speed_leaves_the_speed_to_the_mapper(profile):
    lan = only_lan(request_of(profile(bestEffort=False)))
    assert lan.find(f"{EMULAB}best_effort") is None
    assert lan.findall(f"{RSPEC}property") == []


@pytest.mark.parametrize("count", [2, 254])
def test_node_count_limits_fill_the_lan_addresses(profile, count):
    root = request_of(profile(nodeCount=count))
    addresses = {
        n.get("client_id"): n.find(f"{RSPEC}interface/{RSPEC}ip").get("address")
        for n in nodes_of(root)
    }
    assert addresses == {f"node{i}": f"10.10.1.{i + 1}" for i in range(count)}
    assert len(only_lan(root).findall(f"{RSPEC}interface_ref")) == count


def test_request_carries_the_walk_through_as_its_instructions(profile):
    tour = request_of(profile()).find(f"{TOUR}rspec_tour")
    assert "10.10.1.(i+1)/24" in tour.find(f"{TOUR}description").text
    instructions = tour.find(f"{TOUR}instructions").text
    assert "inventory/cloudlab/manifest.xml" in instructions
    assert "ansible-playbook site.yml" in instructions


# --- refused parameters -------------------------------------------------------------------------

NODE_COUNT = ("Choose between 2 and 254 nodes.", ["nodeCount"])
DATA_SIZE = ("The size of /mydata cannot be negative.", ["dataSize"])
SPEED = ("A reserved link speed needs best-effort bandwidth turned off.",
         ["bestEffort", "linkSpeed"])


@pytest.mark.parametrize(
    ("params", "errors"),
    [
        ({"nodeCount": 1}, [NODE_COUNT]),
        ({"nodeCount": 255}, [NODE_COUNT]),
        ({"dataSize": -1}, [DATA_SIZE]),
        ({"linkSpeed": 10000000}, [SPEED]),
        ({"nodeCount": 0, "dataSize": -20, "linkSpeed": 100000000}, [NODE_COUNT, DATA_SIZE, SPEED]),
        # Not one of the offered speeds: geni-lib itself refuses it.
        ({"linkSpeed": 1000}, [("Illegal value '1000'", ["linkSpeed"])]),
    ],
)
def test_refused_parameters_give_parameter_errors_and_no_request(profile, params, errors):
    assert errors_of(profile(**params)) == errors


# --- standalone -------------------------------------------------------------------------------

def test_command_line_parameters_outside_the_portal(profile):
    root = request_of(profile(argv=["--nodeCount", "2", "--hardwareType", "m510"]))
    assert [(n.get("client_id"), n.find(f"{RSPEC}hardware_type").get("name"))
            for n in nodes_of(root)] == [("node0", "m510"), ("node1", "m510")]

    # geni-lib makes booleans with bool(): only an empty value is false.
    lan = only_lan(request_of(profile(argv=["--bestEffort=", "--linkSpeed", "10000000"])))
    assert lan.find(f"{EMULAB}best_effort") is None
    assert {p.get("capacity") for p in lan.findall(f"{RSPEC}property")} == {"10000000"}

    assert errors_of(profile(argv=["--nodeCount", "1"])) == [NODE_COUNT]


# --- the request is not a manifest ------------------------------------------------------------

def test_inventory_refuses_the_request_and_says_so(profile, tmp_path):
    request = tmp_path / "request.xml"
    request.write_bytes(profile(nodeCount=3).stdout)
    result = subprocess.run(
        [sys.executable, "-m", "distcomp", "inventory", "cloudlab", str(request)],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"distcomp: error: {request}: this is a request RSpec, not a manifest (no node has a "
        "sliver_id or a login); save the experiment's Manifest tab once it is ready\n"
    )


def test_request_fixture_is_what_the_profile_prints(profile):
    """tests/fixtures/cloudlab/request.xml (test_cloudlab.py's request) must stay the profile's
    real output; when the profile changes, regenerate it with the command in its comment."""
    printed = profile(nodeCount=2, hardwareType="m510").stdout
    assert ET.canonicalize(REQUEST_FIXTURE.read_text(), strip_text=True) == ET.canonicalize(
        printed.decode(), strip_text=True
    )
