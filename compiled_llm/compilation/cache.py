"""On-disk cache of compiled pieces.

Layout: `<root>/<engine key>/<piece key>.bin` plus `<piece key>.sha256`. The engine key hashes
everything a compiled piece depends on besides its own graph: torch's version, our own source
code, the pass pipeline's uuids and options, the model config, dtype, device and attention
backend. A piece key hashes the piece's graph and input layout. An entry whose checksum does not
match, or that fails to load, is deleted and rebuilt; it never stops a start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


def source_hash() -> str:
    """Hash of our own Python sources that shape compiled code (the server's excluded)."""
    import compiled_llm
    import compiled_llm.attention_backends
    import compiled_llm.passes

    files: set[Path] = set()
    for package in (compiled_llm, compiled_llm.passes, compiled_llm.attention_backends):
        root = Path(package.__file__).resolve().parent  # type: ignore[arg-type]
        files.update(p for p in root.rglob("*.py") if "server" not in p.relative_to(root).parts)
    h = hashlib.sha256()
    for path in sorted(files):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def engine_key(parts: dict[str, Any]) -> str:
    payload = dict(parts, torch=torch.__version__, source=source_hash())
    blob = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class CompileCache:
    def __init__(self, root: str, key: str) -> None:
        self.dir = Path(root) / key
        self.hits = 0
        self.misses = 0
        self.rebuilt = 0

    def _paths(self, piece_key: str) -> tuple[Path, Path]:
        return self.dir / f"{piece_key}.bin", self.dir / f"{piece_key}.sha256"

    def load(self, piece_key: str) -> Any | None:
        from torch._inductor import CompiledArtifact

        blob, digest = self._paths(piece_key)
        if not blob.exists():
            self.misses += 1
            return None
        try:
            data = blob.read_bytes()
            if hashlib.sha256(data).hexdigest() != digest.read_text().strip():
                raise ValueError("checksum mismatch")
            artifact = CompiledArtifact.load(path=str(blob), format="binary")
        except Exception as e:  # noqa: BLE001 - any broken entry is rebuilt, never fatal
            logger.warning("compile cache entry %s is corrupt (%s); rebuilding it", blob, e)
            blob.unlink(missing_ok=True)
            digest.unlink(missing_ok=True)
            self.rebuilt += 1
            self.misses += 1
            return None
        self.hits += 1
        return artifact

    def save(self, piece_key: str, artifact: Any) -> None:
        blob, digest = self._paths(piece_key)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.dir, suffix=".tmp")
            os.close(fd)
            artifact.save(path=tmp, format="binary")
            data = Path(tmp).read_bytes()
            os.replace(tmp, blob)
            digest.write_text(hashlib.sha256(data).hexdigest())
        except Exception as e:  # noqa: BLE001 - a cache that cannot be written is only slower
            logger.warning("could not write compile cache entry %s: %s", blob, e)
