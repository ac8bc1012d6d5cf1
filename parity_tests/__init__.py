"""The parity proof: flax_resnet against torch_ref (``harness`` holds the comparison)."""
