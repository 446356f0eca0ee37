"""Turn a CloudLab experiment manifest into the Ansible inventory that `site.yml` expects.

CloudLab hands out nodes with unpredictable host names, SSH ports and user names; the only place
that lists them all is the experiment's manifest (an RSpec v3 document: the portal's "Manifest"
tab, or `geni-get manifest` on any node). Copying that by hand into an inventory is where a
cluster first goes wrong, so this module reads the manifest and writes the inventory instead.

The module is stdlib only: it is imported by `inventory/cloudlab/cloudlab.py`, which Ansible runs
with the controller's python3, where neither the runtime's dependencies nor PyYAML may exist.

What comes out, per node (inventory host name = the node's `client_id` from the profile):
`ansible_host`/`ansible_port`/`ansible_user` from `<services><login>`, `distcomp_node_address`
= the node's IPv4 address on the experiment LAN (the network MooseFS and Redis traffic use, never
the control network), `cloudlab_hardware_type` for sizing heterogeneous clusters; and in the `all`
vars `distcomp_manager_address`, the manager's LAN address that every worker connects to.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RSPEC_NS = "http://www.geni.net/resources/rspec/3"
EMULAB_NS = "http://www.protogeni.net/resources/rspec/ext/emulab/1"
DEFAULT_MANAGER = "node0"

CLI_OPTIONS = {"manager": "--manager", "lan": "--lan", "user": "--user",
               "skip_off_lan": "--skip-off-lan"}
"""How error messages tell the user to change a choice; the inventory script names its
environment variables instead."""


def _q(tag: str, ns: str = RSPEC_NS) -> str:
    return f"{{{ns}}}{tag}"


class ManifestError(ValueError):
    """A problem the user fixes by saving another manifest or choosing other options.

    The message is one line, printed after `distcomp: error: FILE: `.
    """


@dataclass(frozen=True)
class Login:
    """One `<login>`: CloudLab lists one per project member whose keys are on the node."""

    username: str
    hostname: str
    port: int


@dataclass(frozen=True)
class LanAddress:
    """A node's `<ip>` on one LAN; the netmask is optional in the schema."""

    address: str
    network: str | None


@dataclass(frozen=True)
class Node:
    """What the inventory needs from one `<node>` of the manifest."""

    name: str
    logins: tuple[Login, ...]
    lan_addresses: dict[str, LanAddress]
    hardware_type: str | None


@dataclass(frozen=True)
class Manifest:
    """The nodes in document order and the LANs that carry IPv4 addresses, in document order."""

    nodes: tuple[Node, ...]
    lans: tuple[str, ...]
    # Per LAN, the interfaces it links that belong to no node listed here.
    absent: dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class Inventory:
    """Groups, host variables and `all` variables, independent of the output format.

    Kept separate from the two renderings (YAML file, JSON for the inventory script) so both say
    exactly the same thing.
    """

    groups: dict[str, list[str]]
    hostvars: dict[str, dict[str, Any]]
    all_vars: dict[str, Any]
    lan: str
    skipped: tuple[str, ...]
    absent: tuple[str, ...]  # interfaces on the LAN of nodes the manifest does not list


def parse_manifest(data: bytes) -> Manifest:
    """Parse manifest bytes; raise ManifestError when it is not a usable CloudLab manifest.

    The root's `type` attribute is not trusted: the portal's Manifest tab has been seen to write
    `type="request"` on real manifests. What distinguishes a manifest is that the testbed filled
    it in: nodes have a `sliver_id` and `<services><login>`.
    """
    document = _document(data)
    try:
        root = ET.fromstring(document)
    except ET.ParseError as exc:
        raise ManifestError(f"not an XML document ({exc})") from None
    except (LookupError, ValueError) as exc:
        # what expat's encoding handling raises: an unknown name (LookupError) or a multi-byte
        # encoding it cannot read, such as UTF-32 or Shift JIS (ValueError)
        raise ManifestError(f"cannot read the encoding its XML declaration names ({exc}); "
                            f"save the manifest as UTF-8") from None
    if root.tag != _q("rspec"):
        raise ManifestError(
            f"not an RSpec v3 manifest (root element is {root.tag}, expected {_q('rspec')})"
        )
    node_elements = root.findall(_q("node"))
    if not node_elements:
        raise ManifestError("the manifest lists no nodes")
    if not any(
        n.get("sliver_id") or n.find(f"{_q('services')}/{_q('login')}") is not None
        for n in node_elements
    ):
        raise ManifestError(
            "this is a request RSpec, not a manifest (no node has a sliver_id or a login); "
            "save the experiment's Manifest tab once it is ready"
        )

    interface_addresses: dict[str, LanAddress] = {}
    nodes = []
    for element in node_elements:
        name = element.get("client_id")
        if not name:
            raise ManifestError("a <node> has no client_id attribute")
        for interface in element.findall(_q("interface")):
            address = _ipv4_of(name, interface)
            if address and interface.get("client_id"):
                interface_addresses[interface.get("client_id", "")] = address
        nodes.append((name, element))

    lan_members = _lan_members(root)
    lans = tuple(lan for lan, members in lan_members.items()
                 if any(m in interface_addresses for m in members))
    listed = {i.get("client_id") for _, element in nodes for i in element.findall(_q("interface"))}
    return Manifest(
        absent={lan: tuple(m for m in members if m not in listed)
                for lan, members in lan_members.items()},
        nodes=tuple(
            Node(
                name=name,
                logins=_logins(name, element),
                lan_addresses=_node_lan_addresses(element, lan_members, interface_addresses),
                hardware_type=_hardware_type(element),
            )
            for name, element in nodes
        ),
        lans=lans,
    )


# Byte-order marks of the encodings a Windows editor or shell may save a copy in. Windows
# PowerShell 5.1's `>` writes UTF-16 and keeps the manifest's own `encoding="UTF-8"`, which the
# XML parser then believes.
_WIDE_BOMS = ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
              (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))


def _document(data: bytes) -> bytes | str:
    """The manifest for the XML parser: text decoded by its byte-order mark, and without the
    blank lines a copy from the portal starts with (after a UTF-8 mark too)."""
    for bom, codec in _WIDE_BOMS:
        if data.startswith(bom):
            try:
                return data.decode(codec).lstrip()
            except UnicodeDecodeError:
                raise ManifestError(f"starts as {codec.upper()} text but is not; save the "
                                    f"manifest as UTF-8") from None
    return data.removeprefix(b"\xef\xbb\xbf").lstrip()


def _ipv4_of(node: str, interface: ET.Element) -> LanAddress | None:
    for ip in interface.findall(_q("ip")):
        address = ip.get("address")
        if not address or ip.get("type", "ipv4").lower() != "ipv4":
            continue
        netmask = ip.get("netmask")
        try:
            ipaddress.IPv4Address(address)
            network = (str(ipaddress.IPv4Interface(f"{address}/{netmask}").network)
                       if netmask else None)
        except ValueError:
            raise ManifestError(
                f"node {node} has an invalid IPv4 address {address!r}/{netmask!r}"
            ) from None
        return LanAddress(address=address, network=network)
    return None


def _lan_members(root: ET.Element) -> dict[str, list[str]]:
    """Map each link's client_id to the interface client_ids on it.

    A multi-site experiment's manifest can list a stitched link once per site, so links with the
    same name are merged rather than the later one hiding the earlier.
    """
    members: dict[str, list[str]] = {}
    for link in root.findall(_q("link")):
        name = link.get("client_id")
        if not name:
            continue
        refs = members.setdefault(name, [])
        for ref in link.findall(_q("interface_ref")):
            interface = ref.get("client_id")
            if interface and interface not in refs:
                refs.append(interface)
    return members


def _node_lan_addresses(
    element: ET.Element,
    lan_members: dict[str, list[str]],
    interface_addresses: dict[str, LanAddress],
) -> dict[str, LanAddress]:
    own = [i.get("client_id") for i in element.findall(_q("interface")) if i.get("client_id")]
    addresses = {}
    for lan, members in lan_members.items():
        for interface in own:
            if interface in members and interface in interface_addresses:
                addresses[lan] = interface_addresses[interface]
                break
    return addresses


def _logins(node: str, element: ET.Element) -> tuple[Login, ...]:
    logins = []
    for login in element.findall(f"{_q('services')}/{_q('login')}"):
        username, hostname = login.get("username"), login.get("hostname")
        if not username or not hostname:
            raise ManifestError(f"node {node} has a <login> without username or hostname")
        port_text = login.get("port", "22")
        digits = port_text.strip()
        # isdecimal alone would pass other scripts' digits, and int() refuses thousands of them
        ok = digits.isascii() and digits.isdecimal() and len(digits) <= 5
        port = int(digits) if ok else 0
        if not 1 <= port <= 65535:
            raise ManifestError(f"node {node} has a <login> with port {port_text!r} "
                                f"(expected 1-65535)")
        logins.append(Login(username=username, hostname=hostname, port=port))
    return tuple(logins)


def _hardware_type(element: ET.Element) -> str | None:
    hardware = element.find(_q("hardware_type"))
    if hardware is not None and hardware.get("name"):
        return hardware.get("name")
    vnode = element.find(_q("vnode", EMULAB_NS))
    if vnode is not None and vnode.get("hardware_type"):
        return vnode.get("hardware_type")
    return None


def build_inventory(
    manifest: Manifest,
    manager: str | None = None,
    lan: str | None = None,
    user: str | None = None,
    skip_off_lan: bool = False,
    options: Mapping[str, str] = CLI_OPTIONS,
) -> Inventory:
    """Choose manager, LAN and login user, and lay the nodes out as Ansible groups.

    Defaults: the manager is `node0` (the name our profile gives it); the LAN is the only one
    there is (with several, guessing could put MooseFS on the wrong network, so the user must
    name it); the user is the first login the manifest lists, the experiment's creator.
    A node that is not on the chosen LAN cannot reach the manager's LAN address, so it is an
    error unless `skip_off_lan`, which leaves such nodes out of the inventory.

    `distcomp_experiment_network` is set per host, not in the `all` vars, because
    group_vars/all.yml next to the inventory would override an `all` var from the inventory.
    """
    names = [node.name for node in manifest.nodes]
    manager = manager or DEFAULT_MANAGER
    if manager not in names:
        raise ManifestError(f"no node named {manager} (nodes: {', '.join(names)}); "
                            f"choose one with {options['manager']}")
    lan = _choose_lan(manifest, lan, options)
    user = user or _first_user(manifest)

    hostvars: dict[str, dict[str, Any]] = {}
    skipped = []
    for node in manifest.nodes:
        address = node.lan_addresses.get(lan)
        if address is None and skip_off_lan and node.name != manager:
            skipped.append(node.name)
            continue
        if address is None and node.name == manager:
            raise ManifestError(f"manager node {node.name} has no address on LAN {lan}")
        if address is None:
            raise ManifestError(f"node {node.name} has no address on LAN {lan}; "
                                f"use {options['skip_off_lan']} to leave it out")
        login = _login_for(node, user, options)
        variables: dict[str, Any] = {
            "ansible_host": login.hostname,
            "ansible_port": login.port,
            "ansible_user": login.username,
            "distcomp_node_address": address.address,
        }
        if address.network:
            variables["distcomp_experiment_network"] = address.network
        if node.hardware_type:
            variables["cloudlab_hardware_type"] = node.hardware_type
        hostvars[node.name] = variables

    return Inventory(
        groups={
            "manager": [manager],
            "workers": [name for name in hostvars if name != manager],
        },
        hostvars=hostvars,
        all_vars={"distcomp_manager_address": hostvars[manager]["distcomp_node_address"]},
        lan=lan,
        skipped=tuple(skipped),
        absent=manifest.absent.get(lan, ()),
    )


def warnings_of(inventory: Inventory) -> list[str]:
    """What an inventory that was still written leaves out, one line each."""
    notes = [f"left out node {name} (no address on LAN {inventory.lan})"
             for name in inventory.skipped]
    if inventory.absent:
        # `geni-get manifest` on a node of a multi-site experiment answers with its site's part.
        notes.append(f"LAN {inventory.lan} also links {', '.join(inventory.absent)}, of nodes "
                     f"this manifest does not list: it holds one site's nodes of a multi-site "
                     f"experiment; save the portal's Manifest tab, which lists them all")
    return notes


def _choose_lan(manifest: Manifest, lan: str | None, options: Mapping[str, str]) -> str:
    if not manifest.lans:
        raise ManifestError(
            "no LAN with IPv4 addresses; distcomp needs its nodes on one experiment LAN "
            "(see cloudlab/profile.py)"
        )
    choices = ", ".join(manifest.lans)
    if lan is not None and lan not in manifest.lans:
        raise ManifestError(
            f"no LAN named {lan} (LANs: {choices}); choose one with {options['lan']}"
        )
    if lan is None and len(manifest.lans) > 1:
        raise ManifestError(f"several LANs ({choices}); choose one with {options['lan']}")
    return lan or manifest.lans[0]


def _first_user(manifest: Manifest) -> str:
    for node in manifest.nodes:
        if node.logins:
            return node.logins[0].username
    raise ManifestError(
        "no node has a login (<services><login>); save the manifest again once the experiment "
        "is ready"
    )


def _login_for(node: Node, user: str, options: Mapping[str, str]) -> Login:
    if not node.logins:
        raise ManifestError(
            f"node {node.name} has no login (<services><login>); save the manifest again once "
            "the experiment is ready"
        )
    for login in node.logins:
        if login.username == user:
            return login
    users = ", ".join(dict.fromkeys(login.username for login in node.logins))
    raise ManifestError(f"no login for user {user} on node {node.name} (users: {users}); "
                        f"choose one with {options['user']}")


def load_manifest(path: str | Path) -> Manifest:
    """Read and parse a manifest file; an unreadable file is a ManifestError like bad content."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ManifestError(f"cannot read the file ({exc.strerror or exc})") from None
    return parse_manifest(data)


def inventory_from_file(
    path: str | Path,
    manager: str | None = None,
    lan: str | None = None,
    user: str | None = None,
    skip_off_lan: bool = False,
    options: Mapping[str, str] = CLI_OPTIONS,
) -> Inventory:
    """The whole pipeline the CLI and the inventory script share."""
    return build_inventory(load_manifest(path), manager, lan, user, skip_off_lan, options)


def to_script_json(inventory: Inventory) -> dict[str, Any]:
    """The `--list` answer of an Ansible inventory script, host variables in `_meta`."""
    result: dict[str, Any] = {
        "_meta": {"hostvars": inventory.hostvars},
        "all": {"children": list(inventory.groups), "vars": inventory.all_vars},
    }
    for group, hosts in inventory.groups.items():
        result[group] = {"hosts": list(hosts)}
    return result


def to_yaml(inventory: Inventory, source: str) -> str:
    """An Ansible YAML inventory, written by hand so the runtime needs no YAML library."""
    tree = {
        "all": {
            "vars": inventory.all_vars,
            "children": {
                group: {"hosts": {host: inventory.hostvars[host] for host in hosts}}
                for group, hosts in inventory.groups.items()
            },
        }
    }
    header = (
        f"# Generated by `distcomp inventory cloudlab` from {source}.\n"
        "# Regenerate it when the experiment changes instead of editing it.\n"
    )
    return header + "".join(_yaml_lines(tree, 0))


_PLAIN_SCALAR = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-/]*")
_YAML_WORDS = {"y", "yes", "n", "no", "true", "false", "on", "off", "null"}


def _yaml_scalar(value: Any) -> str:
    """Plain when YAML reads it back as the same string, else a JSON string (valid YAML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if _PLAIN_SCALAR.fullmatch(text) and text.lower() not in _YAML_WORDS:
        return text
    return json.dumps(text)


def _yaml_lines(mapping: dict[str, Any], depth: int) -> Iterator[str]:
    indent = "  " * depth
    for key, value in mapping.items():
        if isinstance(value, dict) and value:
            yield f"{indent}{_yaml_scalar(key)}:\n"
            yield from _yaml_lines(value, depth + 1)
        elif isinstance(value, dict):
            yield f"{indent}{_yaml_scalar(key)}: {{}}\n"
        else:
            yield f"{indent}{_yaml_scalar(key)}: {_yaml_scalar(value)}\n"


def add_inventory_command(subparsers: argparse._SubParsersAction) -> None:
    """Add `inventory cloudlab MANIFEST ...` to the distcomp CLI.

    The parsed namespace gets `func(args) -> int`; the CLI calls it and exits with its result.
    """
    inventory = subparsers.add_parser(
        "inventory", help="write an Ansible inventory for a cluster",
        description="Write an Ansible inventory for a cluster.", allow_abbrev=False,
    )
    sources = inventory.add_subparsers(dest="inventory_source", metavar="SOURCE", required=True)
    cloudlab = sources.add_parser(
        "cloudlab", help="from a CloudLab experiment manifest",
        description="Write the inventory for a CloudLab experiment from its manifest (the "
        "portal's Manifest tab, or `geni-get manifest` on a node). The manager is node0 unless "
        "--manager says otherwise; every other node is a worker.",
        allow_abbrev=False,
    )
    cloudlab.add_argument("manifest", metavar="MANIFEST", help="manifest XML file")
    cloudlab.add_argument("--manager", metavar="NAME",
                          help=f"node that runs Redis and the MooseFS master "
                          f"(default: {DEFAULT_MANAGER})")
    cloudlab.add_argument("--lan", metavar="NAME",
                          help="LAN whose addresses the cluster uses (required when the "
                          "experiment has several)")
    cloudlab.add_argument("--user", metavar="NAME",
                          help="login user for SSH (default: the first one the manifest lists)")
    cloudlab.add_argument("--skip-off-lan", action="store_true",
                          help="leave out nodes with no address on the LAN instead of failing")
    cloudlab.add_argument("-o", "--output", metavar="FILE",
                          help="write the inventory here instead of stdout")
    cloudlab.set_defaults(func=_run_cloudlab)


def _run_cloudlab(args: argparse.Namespace) -> int:
    """Write the YAML inventory; on bad input print one `distcomp: error:` line and return 2."""
    # Imported here: inventory/cloudlab/cloudlab.py loads this file alone, outside the package.
    from .output import OutputError, one_line, replaced_whole

    manifest = one_line(args.manifest)
    for option, value in (("--manager", args.manager), ("--lan", args.lan),
                          ("--user", args.user)):
        # `--user "$ME"` with ME unset is a mistake, not the default (another member's login).
        if value is not None and not value.strip():
            print(f"distcomp: error: {option} is empty: give a value, or leave the option out "
                  f"for the default", file=sys.stderr)
            return 2
    try:
        inventory = inventory_from_file(
            args.manifest, args.manager, args.lan, args.user, args.skip_off_lan
        )
    except ManifestError as exc:
        print(f"distcomp: error: {manifest}: {exc}", file=sys.stderr)
        return 2
    for note in warnings_of(inventory):
        print(f"distcomp: warning: {manifest}: {note}", file=sys.stderr)
    # A line break in the name would end the header's comment and break the YAML.
    text = to_yaml(inventory, one_line(Path(args.manifest).name))
    if args.output in (None, "-"):
        sys.stdout.write(text)
        return 0
    try:
        with replaced_whole(args.output) as out:
            out.write(text)
    except OutputError as exc:
        # Exit statuses as `export -o`: 2 for a name that is no file, 1 for a failed write.
        print(f"distcomp: error: {one_line(str(exc))} (the inventory was not written)",
              file=sys.stderr)
        return 2 if exc.usage else 1
    return 0
