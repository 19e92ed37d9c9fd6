"""``rgsd make-toy``: write the embedded toy identities to a folder (Market layout or identity folders)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from rgsd_lightning.data import toy


def main(argv: Sequence[str] | None = None) -> int:
    """Write a toy dataset; returns 0 (or 1 with a message on bad arguments)."""
    p = argparse.ArgumentParser(prog="rgsd make-toy", description=main.__doc__)
    p.add_argument("root", help="folder to write (must not exist, or hold the same toy dataset)")
    p.add_argument("--kind", choices=("market", "faces"), default="market", help="person ReID or faces")
    p.add_argument("--ids", type=int, default=None, help="identities (market: train ids; test ids alike)")
    p.add_argument("--images-per-id", type=int, default=None, help="images per identity")
    p.add_argument("--seed", type=int, default=0, help="appearance seed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing toy dataset")
    args = p.parse_args(argv)
    kwargs: dict = {"seed": args.seed, "overwrite": args.overwrite}
    if args.images_per_id is not None:
        kwargs["images_per_id"] = args.images_per_id
    try:
        if args.kind == "market":
            if args.ids is not None:
                kwargs.update(num_train_ids=args.ids, num_test_ids=args.ids)
            path = toy.make_toy_market(args.root, **kwargs)
        else:
            if args.ids is not None:
                kwargs["num_ids"] = args.ids
            path = toy.make_toy_faces(args.root, **kwargs)
    except (ValueError, FileExistsError) as err:
        print(f"rgsd make-toy: {err}")
        return 1
    print(f"toy {args.kind} data at {path}")
    return 0
