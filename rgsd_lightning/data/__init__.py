"""Identity data: records and manifests, dataset parsers, toy identities, transforms, samplers."""

from rgsd_lightning.data.pairs import (
    VerificationPairs,
    load_pairs,
    make_pairs,
    read_pairs_txt,
    read_rfw_groups,
    read_verification_bin,
    save_pairs,
    write_verification_bin,
)
from rgsd_lightning.data.records import (
    IdentityRecord,
    iter_manifest,
    read_manifest,
    write_manifest,
)
from rgsd_lightning.data.sources import (
    read_cuhk03np,
    read_identity_folders,
    read_market1501,
    read_unlabelled_images,
)

__all__ = [
    "IdentityRecord",
    "VerificationPairs",
    "iter_manifest",
    "load_pairs",
    "make_pairs",
    "read_cuhk03np",
    "read_identity_folders",
    "read_manifest",
    "read_market1501",
    "read_pairs_txt",
    "read_rfw_groups",
    "read_unlabelled_images",
    "read_verification_bin",
    "save_pairs",
    "write_manifest",
    "write_verification_bin",
]
