#!/usr/bin/env python3
"""Extract the Proxmox VE API endpoints driftless uses into src/pve/pve-api-subset.json.

Usage: tools/extract-pve-api-subset.py PATH/TO/pve-apidata.json [OUTPUT]

The input is the official API schema (proxmox/pve-docs api-viewer/apidata.js, converted
to JSON: a list of tree nodes with `path`, `info` {METHOD: {...}} and `children`).
OUTPUT defaults to src/pve/pve-api-subset.json next to this script's repository.

Only the schema keys the validator needs are kept: documentation strings
(description, verbose_description, typetext, format_description, ...) are dropped so the
embedded file stays small. Each endpoint's `permissions` keeps its machine-readable part
(`check`, `user`): the sandbox enforces it, and the setup guide's least-privilege role is
checked against it. The output is deterministic (sorted keys, 1-space indent),
so re-running the script on the same input gives the same bytes.
"""

import json
import os
import sys

ENDPOINTS = [
    ("GET", "/version"),
    ("GET", "/nodes"),
    # `driftless doctor`: the token's effective privileges, a node's bridges, its storages
    # (free space) and their content (templates and ISOs).
    ("GET", "/access/permissions"),
    ("GET", "/nodes/{node}/network"),
    ("GET", "/nodes/{node}/storage"),
    ("GET", "/nodes/{node}/storage/{storage}/status"),
    ("GET", "/nodes/{node}/storage/{storage}/content"),
    ("GET", "/cluster/resources"),
    ("GET", "/nodes/{node}/tasks/{upid}/status"),
    # LXC containers
    ("GET", "/nodes/{node}/lxc"),
    ("POST", "/nodes/{node}/lxc"),
    ("DELETE", "/nodes/{node}/lxc/{vmid}"),
    ("GET", "/nodes/{node}/lxc/{vmid}/config"),
    ("PUT", "/nodes/{node}/lxc/{vmid}/config"),
    ("GET", "/nodes/{node}/lxc/{vmid}/pending"),
    ("GET", "/nodes/{node}/lxc/{vmid}/status/current"),
    ("POST", "/nodes/{node}/lxc/{vmid}/status/start"),
    ("POST", "/nodes/{node}/lxc/{vmid}/status/shutdown"),
    ("POST", "/nodes/{node}/lxc/{vmid}/status/stop"),
    ("POST", "/nodes/{node}/lxc/{vmid}/status/reboot"),
    # QEMU virtual machines
    ("GET", "/nodes/{node}/qemu"),
    ("POST", "/nodes/{node}/qemu"),
    ("DELETE", "/nodes/{node}/qemu/{vmid}"),
    ("GET", "/nodes/{node}/qemu/{vmid}/config"),
    ("PUT", "/nodes/{node}/qemu/{vmid}/config"),
    ("POST", "/nodes/{node}/qemu/{vmid}/config"),
    ("GET", "/nodes/{node}/qemu/{vmid}/pending"),
    ("GET", "/nodes/{node}/qemu/{vmid}/status/current"),
    ("POST", "/nodes/{node}/qemu/{vmid}/status/start"),
    ("POST", "/nodes/{node}/qemu/{vmid}/status/shutdown"),
    ("POST", "/nodes/{node}/qemu/{vmid}/status/stop"),
    ("POST", "/nodes/{node}/qemu/{vmid}/status/reboot"),
]

# The schema lists indexed options once as `net[n]`, `mp[n]`, ...; the real servers expand
# them to net0..net31 and so on. The bound is not in the schema, so it is recorded here:
# the LAST valid index, from the constants that generate the keys (PVE 9 sources).
INDEX_BOUNDS = {
    # pve-container src/PVE/LXC/Config.pm
    "mp": 255,  # $MAX_MOUNT_POINTS = 256
    "dev": 255,  # $MAX_DEVICES = 256
    # qemu-server src/PVE/QemuServer/Drive.pm
    "ide": 3,  # $MAX_IDE_DISKS = 4
    "sata": 5,  # $MAX_SATA_DISKS = 6
    "scsi": 30,  # $MAX_SCSI_DISKS = 31
    "virtio": 15,  # $MAX_VIRTIO_DISKS = 16
    "unused": 255,  # $MAX_UNUSED_DISKS = 256 (same for LXC)
    # qemu-server src/PVE/QemuServer.pm; LXC: $MAX_LXC_NETWORKS = 32
    "net": 31,  # $MAX_NETS = 32
    "ipconfig": 31,  # registered in the $MAX_NETS loop
    "serial": 3,  # $MAX_SERIAL_PORTS = 4
    "parallel": 2,  # $MAX_PARALLEL_PORTS = 3
    # qemu-server PCI.pm, USB.pm, Memory.pm, Virtiofs.pm
    "hostpci": 15,  # $MAX_HOSTPCI_DEVICES = 16
    "usb": 13,  # $MAX_USB_DEVICES = 14
    "numa": 7,  # $MAX_NUMA = 8
    "virtiofs": 9,  # $MAX_VIRTIOFS = 10
}

# Documentation-only schema keys: dropped from every schema object.
DOC_KEYS = {
    "description",
    "verbose_description",
    "typetext",
    "format_description",
    "renderer",
    "print_width",
    "title",
    "completion",
}

# Schema keys whose value is a map from a NAME to a schema.
NAMED_SCHEMA_MAPS = {"properties"}
# Schema keys whose value is a single schema (when it is an object).
SUB_SCHEMAS = {"items", "additionalProperties", "requires", "extends", "disallow"}


def strip_schema(schema):
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in DOC_KEYS:
            continue
        if key in NAMED_SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: strip_schema(sub) for name, sub in value.items()}
        elif key == "format" and isinstance(value, dict):
            # property-string format: a map from sub-key name to schema
            out[key] = {name: strip_schema(sub) for name, sub in value.items()}
        elif key in SUB_SCHEMAS and isinstance(value, dict):
            out[key] = strip_schema(value)
        elif key == "oneOf" and isinstance(value, list):
            out[key] = [strip_schema(v) for v in value]
        else:
            out[key] = value
    return out


def walk(nodes):
    for node in nodes:
        yield node
        yield from walk(node.get("children") or [])


def main(argv):
    if len(argv) < 2:
        sys.stderr.write(__doc__)
        return 2
    src = argv[1]
    if len(argv) > 2:
        dst = argv[2]
    else:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        dst = os.path.join(root, "src", "pve", "pve-api-subset.json")

    with open(src, encoding="utf-8") as fh:
        tree = json.load(fh)
    by_path = {node["path"]: node for node in walk(tree)}

    endpoints = []
    for method, path in ENDPOINTS:
        node = by_path.get(path)
        if node is None or method not in (node.get("info") or {}):
            sys.exit(f"{method} {path}: not in {src}")
        info = node["info"][method]
        entry = {
            "method": method,
            "path": path,
            "parameters": strip_schema(info.get("parameters") or {}),
            "returns": strip_schema(info.get("returns") or {}),
        }
        for flag in ("protected", "allowtoken"):
            if flag in info:
                entry[flag] = info[flag]
        perms = {k: v for k, v in (info.get("permissions") or {}).items() if k in ("check", "user")}
        if perms:
            entry["permissions"] = perms
        endpoints.append(entry)

    out = {
        "source": "proxmox/pve-docs api-viewer/apidata.js (PVE 9.1.3), trimmed by "
        "tools/extract-pve-api-subset.py",
        "index_bounds": INDEX_BOUNDS,
        "endpoints": endpoints,
    }
    with open(dst, "w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=1, sort_keys=True, ensure_ascii=False)
        fh.write("\n")
    print(f"wrote {len(endpoints)} endpoints to {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
