"""What a call finds in the store before it starts: each model's ``meta.json`` checked against its
checkpoint, the ids each model already has, and the known failures of the records (a resumed run skips
them all)."""
from __future__ import annotations

from pathlib import Path

from kernel import store as kstore
from kernel.errors import KernelError

DEFAULT_DIM = 512  # width of an entry without ``embedding_dim`` (every model ends in a 512-d descriptor: docs/architectures.md#what-each-model-outputs)


def descriptor_dim(entry: dict) -> int:
    """The width of a model's descriptors."""
    return entry.get("embedding_dim", DEFAULT_DIM)


def checkpoint_sha(entry: dict, weights_dir) -> str | None:
    """The checkpoint's sha256: the manifest's when it pins one, else hashed from the file (None: no file)."""
    if entry.get("sha256"):
        return entry["sha256"]
    path = Path(weights_dir) / entry["checkpoint"]
    if not path.is_file():
        return None
    from kernel.files import sha256_file

    return sha256_file(path)


def check_meta(meta_path: Path, meta: dict, name: str, sha: str | None, image_size: int) -> None:
    """Refuse descriptors computed with another checkpoint or input size than the model has now."""
    for key, have in (("sha256", sha), ("image_size", image_size)):
        if meta.get(key) and have and meta[key] != have:
            raise KernelError(
                f"{meta_path}: descriptors were computed with {key} {str(meta[key])[:16]}, but model "
                f"'{name}' now has {str(have)[:16]}: use another store folder, or discard them with "
                f"'python -m kernel extract ... --overwrite'")


def prepare_model(store: Path, entry: dict, weights_dir, split: str, dtype: str, overwrite: bool) -> set[str]:
    """Check the store's meta.json against the checkpoint (write it when new), drop old descriptors with
    ``overwrite``; returns the ids the model already has for the split."""
    name = entry["name"]
    if overwrite:
        kstore.discard_descriptors(store, name, split)
    sha = checkpoint_sha(entry, weights_dir)
    meta_path = store / name / kstore.META
    meta = kstore.read_meta(store, name) if meta_path.is_file() else {}
    if meta and not overwrite:
        check_meta(meta_path, meta, name, sha, entry["image_size"])
    new = {**meta, **kstore.model_meta(entry, sha or meta.get("sha256"), dtype, descriptor_dim(entry))}
    new.pop("group", None)  # written by earlier versions; nothing reads it
    if new != meta:
        kstore.write_meta(store, name, new)
    return kstore.stored_ids(store, name, split)


def known_failures(store: Path, split: str, id_set: set[str], done: dict[str, set[str]]) -> dict[str, str]:
    """The recorded failures of these records (shards' included). A row of an image every model has a
    descriptor of (decoded by a later retry) is stale and left out."""
    return {k: v for k, v in kstore.read_all_failures(store, split).items()
            if k in id_set and not all(k in d for d in done.values())}
