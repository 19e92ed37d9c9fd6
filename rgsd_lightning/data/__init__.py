"""Identity data: records and manifests, dataset parsers, toy identities, transforms, samplers."""

from rgsd_lightning.data.records import (
    IdentityRecord,
    atomic_write_json,
    atomic_write_text,
    iter_manifest,
    read_manifest,
    write_manifest,
)

__all__ = [
    "IdentityRecord",
    "atomic_write_json",
    "atomic_write_text",
    "iter_manifest",
    "read_manifest",
    "write_manifest",
]
