#!/usr/bin/env python3
"""Ansible inventory script: the CloudLab experiment described by a saved manifest.

`ansible-playbook site.yml -i inventory/cloudlab` runs this with `--list`. It reads
`inventory/cloudlab/manifest.xml` (or the file named by $DISTCOMP_MANIFEST) and answers with the
same groups and variables as `distcomp inventory cloudlab`, so saving the portal's Manifest tab
is the only step between a running experiment and `site.yml`.

Options come from the environment because Ansible passes none to inventory scripts:
DISTCOMP_MANAGER, DISTCOMP_LAN, DISTCOMP_USER, and DISTCOMP_SKIP_OFF_LAN=1 (see docs/cloudlab.md).

Without a manifest the answer is an empty inventory, so that a hand-written `hosts.yml` next to
this script can describe the cluster instead.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARSER = HERE.parent.parent / "distcomp" / "cloudlab.py"
EMPTY = {"_meta": {"hostvars": {}}}
OPTIONS = {"manager": "DISTCOMP_MANAGER", "lan": "DISTCOMP_LAN", "user": "DISTCOMP_USER",
           "skip_off_lan": "DISTCOMP_SKIP_OFF_LAN=1"}


def load_parser():
    """Load distcomp/cloudlab.py by path, not as `distcomp.cloudlab`.

    Importing the package would run distcomp/__init__.py, which may need the runtime's
    dependencies; the controller's python3 only has to have the standard library.
    """
    spec = importlib.util.spec_from_file_location("distcomp_cloudlab", PARSER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv):
    if len(argv) == 2 and argv[1] == "--list":
        host = None
    elif len(argv) == 3 and argv[1] == "--host":
        host = argv[2]
    else:
        print("usage: cloudlab.py --list | --host NAME", file=sys.stderr)
        return 2

    explicit = os.environ.get("DISTCOMP_MANIFEST")
    manifest = Path(explicit) if explicit else HERE / "manifest.xml"
    if not explicit and not manifest.exists():
        if not (HERE / "hosts.yml").exists():
            print(f"cloudlab.py: no manifest at {manifest}: save the experiment's Manifest tab "
                  "there, or write hosts.yml from hosts.yml.example", file=sys.stderr)
        print(json.dumps(EMPTY if host is None else {}))
        return 0

    cloudlab = load_parser()
    try:
        inventory = cloudlab.inventory_from_file(
            manifest,
            manager=os.environ.get("DISTCOMP_MANAGER") or None,
            lan=os.environ.get("DISTCOMP_LAN") or None,
            user=os.environ.get("DISTCOMP_USER") or None,
            skip_off_lan=os.environ.get("DISTCOMP_SKIP_OFF_LAN", "").lower() in ("1", "true", "yes"),
            options=OPTIONS,
        )
    except cloudlab.ManifestError as exc:
        print(f"distcomp: error: {manifest}: {exc}", file=sys.stderr)
        return 2
    for note in cloudlab.warnings_of(inventory):
        print(f"distcomp: warning: {manifest}: {note}", file=sys.stderr)
    if host is not None:
        print(json.dumps(inventory.hostvars.get(host, {})))
    else:
        print(json.dumps(cloudlab.to_script_json(inventory), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
