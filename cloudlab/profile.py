"""A distcomp cluster: node0 (Redis, MooseFS master) and workers node1..nodeN-1 on one LAN.

Every node gets an address 10.10.1.(i+1)/24 on the experiment LAN, which carries all cluster
traffic (Redis, MooseFS), and scratch space at /mydata for MooseFS chunks. Nothing is installed
at boot: Ansible configures the cluster from your laptop.

Instructions:
When the experiment is ready, open its "Manifest" tab, save the XML as
`inventory/cloudlab/manifest.xml` in your distcomp checkout, and run `ansible-playbook site.yml`.
The whole walk-through is in docs/cloudlab.md.
"""

# The portal runs this with its own geni-lib; cloudlab/preview.py runs it with geni-lib from PyPI.
import geni.rspec.emulab  # noqa: F401 (registers Emulab's extensions: LAN.setNoInterSwitchLinks)
from geni import portal
from geni.rspec import pg

IMAGES = [
    ("urn:publicid:IDN+emulab.net+image+emulab-ops//UBUNTU22-64-STD", "Ubuntu 22.04"),
    ("urn:publicid:IDN+emulab.net+image+emulab-ops//UBUNTU24-64-STD", "Ubuntu 24.04"),
]
# Kbps, as geni-lib's Link.bandwidth expects; 0 leaves the NIC speed to the mapper.
LINK_SPEEDS = [
    (0, "Any"),
    (10000000, "10 Gb/s"),
    (25000000, "25 Gb/s"),
    (100000000, "100 Gb/s"),
]

pc = portal.Context()
pc.defineParameter(
    "nodeCount", "Number of nodes", portal.ParameterType.INTEGER, 4,
    longDescription="node0 is the manager; every other node is a worker. At least 2, at most "
    "254 (one /24 LAN).",
)
pc.defineParameter(
    "hardwareType", "Hardware type", portal.ParameterType.NODETYPE, "",
    longDescription="Leave empty to take whatever the cluster has free. One type keeps sizing "
    "simple; distcomp sizes each worker from its own cores and memory either way.",
)
pc.defineParameter(
    "osImage", "OS image", portal.ParameterType.IMAGE, IMAGES[0][0], IMAGES,
)
pc.defineParameter(
    "dataSize", "Size of /mydata in GB", portal.ParameterType.INTEGER, 0,
    longDescription="Temporary filesystem on each node's local disk for MooseFS chunks and "
    "results; it is lost when the experiment ends. 0 takes all the free space.",
)
pc.defineParameter(
    "linkSpeed", "LAN link speed", portal.ParameterType.INTEGER, 0, LINK_SPEEDS,
    advanced=True,
    longDescription="Reserve this bandwidth on the LAN (turn best-effort off). MooseFS reads "
    "and writes chunks over it, so faster links mean faster shared files.",
)
pc.defineParameter(
    "bestEffort", "Best-effort LAN bandwidth", portal.ParameterType.BOOLEAN, True,
    advanced=True,
    longDescription="Let the LAN span switches whose trunks cannot carry full speed for every "
    "node at once, instead of reserving bandwidth. Without it, large experiments often fail "
    "to map.",
)
pc.defineParameter(
    "sameSwitch", "All nodes on one switch", portal.ParameterType.BOOLEAN, False,
    advanced=True,
    longDescription="Full bandwidth between any two nodes, at the price of fewer nodes "
    "being available.",
)
params = pc.bindParameters()

if not 2 <= params.nodeCount <= 254:
    pc.reportError(portal.ParameterError("Choose between 2 and 254 nodes.", ["nodeCount"]))
if params.dataSize < 0:
    pc.reportError(portal.ParameterError("The size of /mydata cannot be negative.", ["dataSize"]))
if params.bestEffort and params.linkSpeed > 0:
    pc.reportError(portal.ParameterError(
        "A reserved link speed needs best-effort bandwidth turned off.",
        ["bestEffort", "linkSpeed"]))
pc.verifyParameters()

request = pc.makeRequestRSpec()

lan = request.LAN("lan")
if params.bestEffort:
    lan.best_effort = True
elif params.linkSpeed > 0:
    lan.bandwidth = params.linkSpeed
if params.sameSwitch:
    lan.setNoInterSwitchLinks()

for i in range(params.nodeCount):
    name = f"node{i}"
    node = request.RawPC(name)
    node.disk_image = params.osImage
    if params.hardwareType:
        node.hardware_type = params.hardwareType
    iface = node.addInterface("eth1")
    iface.addAddress(pg.IPv4Address(f"10.10.1.{i + 1}", "255.255.255.0"))
    lan.addInterface(iface)
    data = node.Blockstore(name + "-bs", "/mydata")
    data.size = f"{params.dataSize}GB"
    data.placement = "any"

pc.printRequestRSpec(request)
