"""Read the history rows of an offline wandb run file (run-*.wandb) without network or wandb's service.

The file is W&B's leveldb-style log: a 7-byte file header (":W&B", magic, version), then 32 KiB blocks of
chunks, each with a 7-byte header (crc32, little-endian length, type FULL/FIRST/MIDDLE/LAST) and a
piece of a serialized `Record` protobuf.
"""

import json
import struct
from pathlib import Path

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", "not a wandb run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        else:
            break


def history(path: Path) -> list[dict]:
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for raw in records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "history":
            rows.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                         for item in rec.history.item})
    return rows


def run_info(path: Path) -> dict:
    """The run record of an offline run file: id, project, name, tags and the config (top-level keys)."""
    from wandb.proto import wandb_internal_pb2 as pb

    for raw in records(path):
        rec = pb.Record()
        rec.ParseFromString(raw)
        if rec.WhichOneof("record_type") == "run":
            r = rec.run
            return {"id": r.run_id, "project": r.project, "name": r.display_name, "tags": list(r.tags),
                    "config": {item.key: json.loads(item.value_json) for item in r.config.update}}
    raise AssertionError(f"{path} has no run record")
