"""Loading a prepared set: a split in one read per array, and the folder that a training script's
`dataset` key names, prepared when missing."""
import dataclasses
import json
from pathlib import Path

import numpy as np

from utils.data.prepare import DATA, SPLITS, PrepareOptions, load_manifest, own_sprites_folder, prepare
from utils.errors import UserError


@dataclasses.dataclass
class SpriteSet:
    """One split, packed: uint8 images [N,H,W,3], bool sprite masks [N,H,W], names."""

    images: np.ndarray
    masks: np.ndarray
    names: list

    def __len__(self):
        return len(self.names)

    def subset(self, count):
        return SpriteSet(self.images[:count], self.masks[:count], self.names[:count])


def load_split(data_dir, split):
    """Load a prepared split in one read per array, with no PNG decoding."""
    data_dir = Path(data_dir)
    if not (data_dir / "manifest.json").exists():
        raise UserError(f"{data_dir} holds no prepared data set (no manifest.json); "
                        "run `python -m utils.data prepare` or point `dataset` elsewhere")
    try:
        images = np.load(data_dir / f"{split}_images.npy", allow_pickle=False)
        masks = np.load(data_dir / f"{split}_masks.npy", allow_pickle=False)
        names = json.loads((data_dir / f"{split}_names.json").read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"the packed {split} split in {data_dir} cannot be read ({err}); "
                        "prepare it again with --force") from None
    if not (len(images) == len(masks) == len(names)):
        raise UserError(f"the packed {split} split in {data_dir} is inconsistent; prepare it again with --force")
    if len(names) == 0 and load_manifest(data_dir)["parameters"].get("test_only"):
        raise UserError(f"{data_dir} is an evaluation set, prepared with every sprite in its test split; "
                        f"it has no {split} split to train on")
    if len(names) == 0:
        raise UserError(f"the {split} split in {data_dir} is empty; it needs more species")
    return SpriteSet(images, masks, names)


def resolve_dataset(dataset, image_size, log=print):
    """The prepared folder for a training script's `dataset` key, preparing it when missing.

    'pokemon' is the default set; a folder that holds manifest.json is used as it is; any other
    folder or zip is taken as the user's own sprites."""
    options = PrepareOptions(image_size=image_size)
    if dataset == "pokemon":
        prepare(None, DATA / "pokemon", options, log=log)
        return DATA / "pokemon"
    path = Path(dataset)
    if (path / "manifest.json").exists():
        size = load_manifest(path)["parameters"]["image_size"]
        if size != image_size:
            raise UserError(f"{path} was prepared at {size}x{size}, but image_size is {image_size}")
        return path
    out = own_sprites_folder(path)
    prepare(path, out, options, log=log)
    return out


def prepared_folder(dataset):
    """The prepared folder of a training script's `dataset` key, whether or not it exists yet."""
    if dataset == "pokemon":
        return DATA / "pokemon"
    return Path(dataset) if (Path(dataset) / "manifest.json").exists() else own_sprites_folder(dataset)


def read_splits(data_dir, image_size):
    """The train, validation and test sets of a prepared folder, checked against `image_size`."""
    train_set, val_set, test_set = (load_split(data_dir, s) for s in SPLITS)
    if train_set.images.shape[1] != image_size:
        raise UserError(f"{data_dir} holds {train_set.images.shape[1]}-pixel images, "
                        f"but image_size is {image_size}")
    return train_set, val_set, test_set


def load_splits(dataset, image_size):
    """(prepared folder, train, val, test) for a script's `dataset` key, prepared when missing."""
    data_dir = resolve_dataset(dataset, image_size)
    return (data_dir, *read_splits(data_dir, image_size))
