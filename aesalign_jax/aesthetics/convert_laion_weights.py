"""One-off conversion of the published LAION aesthetic predictor weights to safetensors.

The LAION improved aesthetic predictor (github.com/christophschuhmann/improved-aesthetic-
predictor) publishes its MLP as a torch state dict, e.g. `sac+logos+ava1-l14-linearMSE.pth`
(for OpenAI CLIP ViT-L/14 embeddings, 768 wide). This script turns such a file into the
safetensors file that `aesalign_jax.aesthetics.iap.load_params` reads, once, on a machine with
torch installed (`pip install torch`, CPU is enough); training and scoring never import torch:

  python -m aesalign_jax.aesthetics.convert_laion_weights \
      --pth sac+logos+ava1-l14-linearMSE.pth --out iap_vit_l14.safetensors

The .pth is read with torch.load(weights_only=True), which refuses pickled code. Its keys are
`layers.{i}.weight` ([out, in]) and `layers.{i}.bias` of the nn.Sequential's five Linear
layers: i = 0, 2, 4, 6, 7 in the published linear head (Dropouts in between, no activations),
i = 0, 3, 6, 9, 11 in the "reluMSE" variant (a ReLU after each of the first four). The layout
tells the activation, which is written into the file's metadata. Weights are transposed to
our `dense_{k}.kernel` [in, out] and kept in float32.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from aesalign_jax.aesthetics import iap

# Linear-layer indices inside the published nn.Sequential, per activation.
LAYOUTS = {(0, 2, 4, 6, 7): "none", (0, 3, 6, 9, 11): "relu"}


def convert_state_dict(state: dict, source: str = "state dict") -> tuple[dict, str]:
  """Maps a LAION MLP state dict (name -> tensor or array) to (our params as numpy, activation)."""
  if "state_dict" in state and isinstance(state["state_dict"], dict):  # a Lightning checkpoint
    state = state["state_dict"]
  arrays = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, np.float32)
            for k, v in state.items()}
  linear = sorted(int(m.group(1)) for k in arrays
                  if (m := re.fullmatch(r"layers\.(\d+)\.weight", k)))
  if tuple(linear) not in LAYOUTS:
    raise ValueError(f"{source}: expected Linear layers at layers.{{0,2,4,6,7}} (linear head) or "
                     f"layers.{{0,3,6,9,11}} (ReLU head); found weights at {linear} "
                     f"(keys: {sorted(arrays)})")
  activation = LAYOUTS[tuple(linear)]
  params = {}
  for k, index in enumerate(linear):
    for suffix in ("weight", "bias"):
      key = f"layers.{index}.{suffix}"
      if key not in arrays:
        raise ValueError(f"{source}: missing key {key!r}")
    params[f"dense_{k}.kernel"] = np.ascontiguousarray(arrays[f"layers.{index}.weight"].T)
    params[f"dense_{k}.bias"] = arrays[f"layers.{index}.bias"]
  embed_dim = params["dense_0.kernel"].shape[0]
  for name, shape in iap.param_shapes(embed_dim).items():
    if params[name].shape != shape:
      raise ValueError(f"{source}: {name} (from the torch Linear) has shape "
                       f"{params[name].shape}, expected {shape}")
  unused = sorted(set(arrays) - {f"layers.{i}.{s}" for i in linear for s in ("weight", "bias")})
  if unused:
    raise ValueError(f"{source}: unexpected keys {unused}")
  return params, activation


def convert(pth: str | Path, out: str | Path) -> str:
  """Converts the .pth at `pth` into safetensors at `out`; returns the activation found."""
  import torch  # only this one-off script needs torch

  state = torch.load(str(pth), map_location="cpu", weights_only=True)
  if not isinstance(state, dict):
    raise ValueError(f"{pth}: expected a state dict, got {type(state).__name__}")
  params, activation = convert_state_dict(state, str(pth))
  iap.save_params(out, params, activation=activation)
  return activation


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--pth", required=True, help="the LAION .pth state dict")
  parser.add_argument("--out", required=True, help="the .safetensors file to write")
  args = parser.parse_args(argv)
  if not args.out.endswith(".safetensors"):
    parser.error("--out must end in .safetensors")
  activation = convert(args.pth, args.out)
  params, _ = iap.load_params(args.out)
  print(f"wrote {args.out}: embed_dim {params['dense_0.kernel'].shape[0]}, "
        f"activation {activation}")


if __name__ == "__main__":
  main()
