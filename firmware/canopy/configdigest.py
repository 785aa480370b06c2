"""Canonical JSON form and sha256 digest of a node config (see canopy.config).

Kept apart from canopy.config so a node that never computes a digest (text link) does
not load this code; ``config.canonical_json`` and ``config.digest`` forward here.

Usage::

    from canopy import config
    print(config.digest(config.merged()))   # same hex as the host's canopy_host tools
"""


def _canonical(value, parts):
    # MicroPython's json has no sort_keys, so build the canonical form by hand:
    # sorted keys, no spaces, same as json.dumps(sort_keys=True, separators=(",", ":")).
    if isinstance(value, dict):
        parts.append("{")
        first = True
        for key in sorted(value):
            if not first:
                parts.append(",")
            first = False
            _canonical(str(key), parts)
            parts.append(":")
            _canonical(value[key], parts)
        parts.append("}")
    elif isinstance(value, (list, tuple)):
        parts.append("[")
        for i, item in enumerate(value):
            if i:
                parts.append(",")
            _canonical(item, parts)
        parts.append("]")
    elif value is True:
        parts.append("true")
    elif value is False:
        parts.append("false")
    elif value is None:
        parts.append("null")
    elif isinstance(value, int):
        parts.append(str(value))
    elif isinstance(value, str):
        import json

        parts.append(json.dumps(value))
    else:
        raise ValueError("config: cannot serialise %r" % (value,))


def canonical_json(cfg):
    parts = []
    _canonical(cfg, parts)
    return "".join(parts)


def digest(cfg):
    """sha256 hex of the canonical JSON of cfg (identical on host and node)."""
    import hashlib
    import binascii

    h = hashlib.sha256(canonical_json(cfg).encode())
    return binascii.hexlify(h.digest()).decode()


