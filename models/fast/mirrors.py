"""What the fast path mirrors: each method and function of models/ whose maths it computes another
way, beside its fast twin, and the fingerprint of the source that the twin was checked against.

A twin computes what its original does only while the original is the code that
tests/test_fast_equivalence.py compared it with. So the guard (guard.py) runs the fast path only
while every original hashes to its fingerprint in fingerprints.json, which that test file alone
rewrites, and only once all its checks have passed (`REFRESH`). A class patched at run time, or a
file edited since, fails its fingerprint; so does anything whose source cannot be read.
"""
import functools
import hashlib
import importlib
import inspect
import json
import textwrap
from pathlib import Path

from torch import nn

FINGERPRINTS = Path(__file__).with_name("fingerprints.json")
REFRESH_VARIABLE = "PIXEL_VQVAE_REFRESH_FAST_FINGERPRINTS"
REFRESH = f"{REFRESH_VARIABLE}=1 python -m pytest tests/test_fast_equivalence.py"

# Each original by qualified name: its twin in models/fast, which the guard's warning names.
# Not here: what the fast models inherit and so run as written (VAE's methods, VQVAE.encode and
# decode_indices, loss_terms), and the quantiser's methods that quantize calls rather than copies.
MIRRORED = {
    "models.encoder.Encoder.forward": "FastEncoder.forward (models.py)",
    "models.decoder.Decoder.forward": "FastDecoder.forward (models.py)",
    "models.decoder.StretchedSigmoid.forward": "its gradient, written out in codes.py",
    "models.vqvae.VQVAE.forward": "FastVQVAE.forward (models.py)",
    # FastVQVAE.forward runs the encoder and decoder itself, without these two.
    "models.vqvae.VQVAE.encode_latents": "FastVQVAE.forward (models.py)",
    "models.vqvae.VQVAE.decode": "FastVQVAE.forward (models.py)",
    "models.vqvae.VQVAE.quantize": "FastVQVAE.quantize (models.py)",
    # The straight-through estimator and the commitment loss are _StraightThrough's.
    "models.quantizer.VectorQuantizerEMA.forward": "quantize and _StraightThrough (quantizer.py)",
    "models.quantizer.VectorQuantizerEMA.nearest_codes": "quantize (quantizer.py)",
    "models.quantizer.nearest_code": "nearest_code (quantizer.py) and kernels.cpp",
    "models.batchnorm.SyncBatchNorm2d.forward": "normalize_by_batch (batchnorm.py) and fused_pointwise (pointwise.py)",
    # The fast BatchNorms update running statistics by it where nn.BatchNorm2d has its own update.
    "models.batchnorm.update_running_statistics": "the BatchNorms of batchnorm.py and pointwise.py",
}
# torch's own, which the fast path also computes another way; pinned with torch (requirements.txt),
# so they are checked to be torch's, not patched, rather than fingerprinted.
TORCH_OWN = ["torch.nn.Sequential.forward", "torch.nn.Conv2d.forward", "torch.nn.ConvTranspose2d.forward",
             "torch.nn.BatchNorm2d.forward", "torch.nn.ReLU.forward", "torch.nn.functional.mse_loss"]


@functools.lru_cache(maxsize=None)
def resolve(qualified: str) -> tuple[object, str]:
    """(the class or module that holds it, its attribute name) of a name in MIRRORED or TORCH_OWN;
    the holder once, its attribute read at each check, for that is what a patch replaces."""
    parts = qualified.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            owner = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for part in parts[split:-1]:
            owner = getattr(owner, part)
        return owner, parts[-1]
    raise ValueError(f"{qualified} names no module")


def _original(qualified: str):
    owner, name = resolve(qualified)
    return getattr(owner, name)


def _overridable() -> dict[type, set[str]]:
    """Attributes that, set on a module itself, would replace what the fast path mirrors: every
    module's forward (the fused layers never call one), and the mirrored methods of its class."""
    found: dict[type, set[str]] = {}
    for owner, name in map(resolve, MIRRORED):
        if isinstance(owner, type):
            found.setdefault(owner, {"forward"}).add(name)
    return found


OVERRIDABLE = _overridable()


@functools.lru_cache(maxsize=None)
def fingerprint(function) -> str | None:
    """sha256 of a function's source, dedented, without trailing spaces; None where there is no
    source to read. Once per function object: the guard then costs a dictionary look-up."""
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return None
    lines = [line.rstrip() for line in textwrap.dedent(source).splitlines()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def current() -> dict[str, str | None]:
    """The fingerprint of each mirrored original as it is now, by qualified name."""
    return {qualified: fingerprint(_original(qualified)) for qualified in MIRRORED}


@functools.lru_cache(maxsize=1)
def checked() -> dict[str, str]:
    """The fingerprints the equivalence tests last passed on (fingerprints.json); none without it."""
    return json.loads(FINGERPRINTS.read_text()) if FINGERPRINTS.exists() else {}


def mirror_problem() -> str | None:
    """What the fast path mirrors that is no longer what it was checked against; None when all is."""
    expected = checked()
    changed = [f"{qualified} (mirrored by {twin})" for qualified, twin in MIRRORED.items()
               if fingerprint(_original(qualified)) != expected.get(qualified)]
    if changed:
        return (f"{', '.join(changed)} changed since the fast path was checked against "
                f"{'it' if len(changed) == 1 else 'them'}; once the fast twin computes the same, "
                f"`{REFRESH}` re-checks them and, if every check passes, refreshes {FINGERPRINTS.name}")
    patched = [qualified for qualified in TORCH_OWN
               if not (getattr(_original(qualified), "__module__", None) or "").startswith("torch.")]
    if patched:
        return f"{', '.join(patched)} is not torch's own, which the fast path computes another way"
    return None


def overridden(module: nn.Module) -> str | None:
    """The mirrored attribute that `module` sets on itself, replacing its class's; None if none."""
    own = vars(module)
    for name in sorted(OVERRIDABLE.get(type(module), {"forward"})):
        if name in own:
            return name
    return None
