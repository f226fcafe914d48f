"""Read what a Metaflow card shows: its components live base64-encoded JSON inside the HTML."""

import base64
import json
import re


def card_text(html: str) -> str:
    """All component JSON of a card's HTML, decoded, as one searchable string."""
    blobs = re.findall(r'__MF_DATA__\[[^\]]+\]\s*=\s*"([A-Za-z0-9+/=]+)"', html)
    assert blobs, "no card data found in the HTML"
    return "\n".join(json.dumps(json.loads(base64.b64decode(b)), ensure_ascii=False) for b in blobs)
