"""Getting a trained adapter out: ``save_weights_external`` and signed, expiring download URLs.

``save_weights_external(name)`` writes the run's adapter as a stock PEFT directory (``adapter_config.json`` +
``adapter_model.safetensors``, what ``PeftModel.from_pretrained`` loads) and lists it as
``tinker://<run>/external_weights/<name>``. ``GET …/checkpoints/external_weights/<name>/external_weights_urls``
answers one URL per file, on this server's own HTTP surface, signed (HMAC-SHA256 with a secret kept in the
state store) for that file of that checkpoint until ``expires``: the URL itself is the credential, as with a
cloud store's presigned URLs, so ``tinker checkpoint download`` fetches it with a plain GET. A URL stops
working when it expires or when the checkpoint is deleted; it never reaches a file outside the checkpoint.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from typing import TYPE_CHECKING

from twinkle.common.wire import NotFoundError, UserError

from ..core import ControlPlane
from ..core.checkpoints import CheckpointRef
from ..core.state import CheckpointRecord, RunRecord
from . import convert as C
from . import protocol as P
from .settings import TinkerSettings

if TYPE_CHECKING:
    from ..core.ports import ModelPort
    from .serving import TinkerService

EXTERNAL = "external_weights"
FILES_ROUTE = "external_weights_files"
_SECRET_KEY = "external_weights_url_secret"


class TinkerExport:
    def __init__(self, settings: TinkerSettings, plane: ControlPlane, service: "TinkerService") -> None:
        self.settings = settings
        self.plane = plane
        self.service = service
        self._secret: bytes | None = None

    async def save_weights_external(self, owner: str, req: P.SaveWeightsExternalRequest) -> P.UntypedFuture:
        if req.age_encryption_recipients:
            raise UserError("encrypting exported weights is not supported by this server; export them "
                            "unencrypted (the download URLs are signed and expire)", field="age_encryption_recipients")

        async def prepare(run: RunRecord, port: "ModelPort"):
            ref, path, expires = await self.service.new_checkpoint(owner, run, EXTERNAL, req.path, req.ttl_seconds,
                                                                   overwrite=False)

            async def work() -> dict[str, object]:
                info = await port.save_sampler_weights(run.id, owner, req.seq_id, path)
                c = await self.plane.record_checkpoint(owner, run, ref, path, info, expires)
                return {"type": "save_weights_external", "path": ref.uri, "size_bytes": c.size_bytes}

            return work

        return await self.service.numbered(owner, req.model_id, req.seq_id, "save_weights_external", prepare)

    async def urls(self, owner: str, run_id: str, name: str, base_url: str) -> P.ExternalWeightsUrlsOut:
        """One signed URL per file of the caller's external weights checkpoint, valid for ``download_url_ttl_s``."""
        c = await self.plane.own_checkpoint(owner, run_id, EXTERNAL, name, field="checkpoint_id",
                                            uri=CheckpointRef(run_id=run_id, kind=EXTERNAL, name=name).uri)
        self.plane.audit_checkpoint(c, "checkpoint_read", owner, purpose="download")
        expires = int(time.time() + self.settings.download_url_ttl_s)
        secret = await self._key()
        urls = {}
        for rel in _files(c.path):
            token = _token(secret, owner, run_id, name, rel, expires)
            urls[rel] = f"{base_url}/{FILES_ROUTE}/{token}/{rel}"
        return P.ExternalWeightsUrlsOut(urls=urls, expires=C.iso(expires) or "")

    async def file_path(self, token: str, rel: str) -> str:
        """The file a signed URL names, or ``NotFoundError`` (403-free on purpose: a bad or stale URL reveals
        nothing about what exists)."""
        try:
            payload, sig = token.split(".", 1)
            owner, run_id, name, expires_s = base64.urlsafe_b64decode(payload.encode() + b"==").decode().split("\n")
            expires = int(expires_s)
        except ValueError:
            raise NotFoundError("no such download (the URL is malformed)") from None
        expected = _token(await self._key(), owner, run_id, name, rel, expires)
        if not hmac.compare_digest(expected, token):
            raise NotFoundError("no such download (the URL's signature does not match)")
        if time.time() > expires:
            raise NotFoundError("this download URL has expired; ask for new ones (external_weights_urls)")
        c: CheckpointRecord | None = await self.plane.store.get_checkpoint(run_id, EXTERNAL, name)
        if c is None or c.owner != owner or rel not in _files(c.path):
            raise NotFoundError("the checkpoint of this download URL no longer exists")
        return os.path.join(c.path, rel)

    async def _key(self) -> bytes:
        if self._secret is None:
            self._secret = bytes.fromhex(await self.plane.store.meta_setdefault(_SECRET_KEY, secrets.token_hex(32)))
        return self._secret


def _token(secret: bytes, owner: str, run_id: str, name: str, rel: str, expires: int) -> str:
    payload = "\n".join((owner, run_id, name, str(expires)))
    mac = hmac.new(secret, f"{payload}\n{rel}".encode(), hashlib.sha256).digest()
    encode = base64.urlsafe_b64encode
    return f"{encode(payload.encode()).decode().rstrip('=')}.{encode(mac).decode().rstrip('=')}"


def _files(root: str) -> list[str]:
    """Regular files under a checkpoint directory, relative, '/'-separated; links are never followed."""
    out = []
    for dirpath, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(dirpath, d))]
        for f in files:
            full = os.path.join(dirpath, f)
            if os.path.isfile(full) and not os.path.islink(full):
                out.append(os.path.relpath(full, root).replace(os.sep, "/"))
    return sorted(out)
