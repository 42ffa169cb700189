"""A node's stable identity, kept next to its local prompt: no torch, so that messages which only need the key
(SecFPP's node-key query and its phase messages) are answered without loading it."""

from __future__ import annotations

import secrets
from pathlib import Path

from dpfpl.common.atomic import write_bytes

NODE_KEY_FILE = "node-key"


def node_key(directory: Path) -> int:
    """This node's stable identity: a random 62-bit number kept next to its local prompt.

    Why: the server keeps per-node books for the accountant (sample rate, rounds taken part in). Flower's node
    id is not stable everywhere (a simulation resumed from a checkpoint, or a restarted SuperNode without
    node authentication, gets a new one), and books split over two ids would under-count a node's epsilon.
    The key lives and dies with the local prompt whose releases it counts; it is random, so it says nothing
    about the organization.
    """
    path = Path(directory) / NODE_KEY_FILE
    if path.is_file():
        text = path.read_text().strip()
        if text.isdigit() and 0 < int(text) < 2**62:
            return int(text)
        raise ValueError(
            f"{path} holds no node key ('{text[:40]}'); delete it to give this node a new identity "
            "(the server then books it as a new node)"
        )
    key = secrets.randbits(62) or 1
    write_bytes(path, f"{key}\n".encode())
    return key
