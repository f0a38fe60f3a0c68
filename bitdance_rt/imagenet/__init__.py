"""The class-conditional ImageNet family (BitDance-B/L/H, 1, 4 or 16 tokens per AR step):
its spec and presets (``spec``), the transformer and the diffusion heads (``transformer``,
``head``), the released ``.pt`` files read safely (``pt_files``), converted checkpoint
directories (``checkpoint``), the sampler (``sample``), class names (``classes``) and tiny
test checkpoints (``tiny``). The binary autoencoder is the text-to-image family's
(:mod:`bitdance_rt.models.autoencoder`)."""
