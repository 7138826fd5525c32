"""Reads the history back from a W&B run file (`run-<id>.wandb`, what offline mode writes), for the tracker tests.

The file is a 7-byte header (":W&B", a 2-byte magic, a version byte) followed by LevelDB's log format: 32 KiB blocks of
records, each with a 7-byte header (checksum uint32, length uint16, type uint8: 1 whole, 2 first, 3 middle, 4 last
fragment; a block's tail shorter than a header is padding), whose payloads are `wandb_internal_pb2.Record` messages.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

_BLOCK = 32 * 1024
_HEADER = 7


def records(path) -> list[bytes]:
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    out, frag, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < _HEADER:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        payload = data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind == 1:
            out.append(payload)
        elif kind == 2:
            frag = payload
        elif kind == 3:
            frag += payload
        elif kind == 4:
            out.append(frag + payload)
    return out


def history(path) -> list[dict]:
    """Every `run.log` call of the file, as {key: value} with JSON-decoded values."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for payload in records(path):
        rec = pb.Record()
        rec.ParseFromString(payload)
        if rec.WhichOneof("record_type") == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows
