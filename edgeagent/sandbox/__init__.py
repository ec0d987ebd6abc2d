"""A local stand-in of the WeChat Pay parking API for commissioning and tests (SPEC §8).

`ca` mints and keeps the key material, `api` emulates the API (one route per kind of
`requests.KINDS`: checks, idempotency, signed answers, misbehaviour knobs), `nonces` remembers request
nonces for the replay check, `server` carries it over HTTPS and is the `edgeagent sandbox` command.
"""

from edgeagent.sandbox.api import Knobs
from edgeagent.sandbox.ca import Materials, ensure_materials
from edgeagent.sandbox.server import Sandbox, serve

__all__ = ["Knobs", "Materials", "Sandbox", "ensure_materials", "serve"]
