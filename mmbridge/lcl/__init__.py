"""LCL (latent compression learning): pretrain a ViT from scratch on interleaved image-text data."""
