"""mimflow components: the science, in plain PyTorch (no orchestration or tracking imports)."""
